"""Data: sources and formats, tokenization cache, mixing, packing, sharded resumable loading."""
