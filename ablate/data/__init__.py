"""Synthetic multimodal corpus: scenes, tokenizer, webdataset shards, and their formats."""
