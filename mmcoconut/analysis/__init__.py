"""What the continuous thoughts hold: decoded tokens, attention, linear probes."""
