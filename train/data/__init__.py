"""The data pipeline: sources, tokenizer, fixed-length batches, streaming."""
