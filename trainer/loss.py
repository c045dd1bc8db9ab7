"""The loss of invariant 2: token losses summed, divided by the global target count.

Averaging per micro-batch (the common default) weighs a token in a short
micro-batch more than one in a long micro-batch, so accumulation and world size
change the update. Here every micro-batch returns its *sum*; the loop divides by
the number of target tokens of the whole optimizer step over all ranks, counted
before the first backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_targets(labels: torch.Tensor, task: str) -> int:
    """Targets in a micro-batch: next-token labels (after the shift) or one per row."""
    if task == "sequence_classification":
        return int(labels.numel())
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Sum of per-target cross-entropies in float32 (the caller normalises)."""
    if task == "sequence_classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    # logits[t] predicts labels[t + 1]; a document's first token is labelled -100,
    # so the previous document's last position never predicts it.
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
