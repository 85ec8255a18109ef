"""Training data: the offline corpus (`corpus`), the grain pipeline (`pipeline`) and the
needle-in-a-haystack prompts and training rows (`needles`)."""
