"""The model side of training: loading a base model and its tokenizer, attention backends
(document-isolated varlen and masked), sequence parallelism, the loss and its target-only
head, 4-bit quantization, per-layer compilation and activation offloading."""
