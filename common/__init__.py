"""The base every package builds on: config machinery, label names, the report tokenizer."""
