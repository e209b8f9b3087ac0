"""The sequence layout, in text: prompt, latent span, step and answer lines, choices, reading the answer back."""
