"""Training data: the offline corpus, the byte tokenizer and the grain pipeline."""
