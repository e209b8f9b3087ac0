"""Using a trained checkpoint: the one loader (`loading`), decoding helpers (`decoding`), one answer (`prediction`)."""
