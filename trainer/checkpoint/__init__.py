"""Checkpoints and what a run leaves on disk: the checkpointer (atomic, checksummed, retention),
the folder layout and its completion mark, the trainer state, checksums, the run-folder lock,
and export to a Hugging Face folder."""
