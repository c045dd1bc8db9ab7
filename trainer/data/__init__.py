"""Data: sources and formats, tokenization cache, mixing, packing, sharded resumable loading."""

from trainer.data.collate import Batch, describe_batch
from trainer.data.loader import (TrainLoader, build_eval_sets, build_train_loader, held_out_conversations,
                                 prepare_data, training_texts)

__all__ = ["Batch", "TrainLoader", "build_eval_sets", "build_train_loader", "describe_batch",
           "held_out_conversations", "prepare_data", "training_texts"]
