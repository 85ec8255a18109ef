"""Evaluation and diagnostics: the needle-in-a-haystack grid (`niah`) and the probes of what limits
retrieval (`forget`, `recall`) and training stability (`stability`)."""
