"""The loss of invariant 2: token losses summed, divided by the global target count.

Averaging per micro-batch (the common default) weighs a token in a short
micro-batch more than one in a long micro-batch, so accumulation and world size
change the update. Here every micro-batch returns its *sum*; the loop divides by
the number of target tokens of the whole optimizer step over all ranks, counted
before the first backward.

`forward_summed_loss` is the one way the loop and evaluation get a micro-batch's summed
loss: through the target-only head of `trainer.model.loss_head` when the model has one
(`train.fused_loss`), else from the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.loss_head import fused_head, head_log_probs, head_token_log_probs, summed_target_loss

IGNORE_INDEX = -100


def count_targets(labels: torch.Tensor, task: str) -> int:
    """Targets in a micro-batch: next-token labels (after the shift) or one per row."""
    if task == "sequence_classification":
        return int(labels.numel())
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str, shifted: bool = False) -> torch.Tensor:
    """Sum of per-target cross-entropies in float32 (the caller normalises). `shifted`: labels
    are already the next tokens (a sequence shard, trainer/data/sequence_shard.py)."""
    if task == "sequence_classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    # logits[t] predicts labels[t + 1]; a document's first token is labelled -100,
    # so the previous document's last position never predicts it.
    shift_logits = logits.float() if shifted else logits[..., :-1, :].float()
    shift_labels = labels if shifted else labels[..., 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def model_logits(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Forward, returning logits aligned with `labels` (prompt tuning prepends virtual tokens)."""
    logits = model(**inputs).logits
    if labels.dim() == 2 and logits.size(1) > labels.size(1):
        logits = logits[:, -labels.size(1):]
    return logits


def forward_summed_loss(model: nn.Module, inputs: dict, labels: torch.Tensor, task: str,
                        shifted: bool = False) -> torch.Tensor:
    """Forward one micro-batch; the sum of its per-target cross-entropies in float32 (`shifted`:
    labels are already the next tokens, as in a sequence shard)."""
    head = fused_head(model)
    next_tokens = labels if shifted else labels[..., 1:]  # the same shift as summed_loss
    if head is None:
        return summed_loss(model_logits(model, inputs, labels), labels, task, shifted)
    is_target = next_tokens != IGNORE_INDEX
    return summed_target_loss(model, head, inputs, is_target, next_tokens[is_target], shifted)


def target_log_probs(model: nn.Module, inputs: dict, rows: torch.Tensor, cols: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """Forward one micro-batch; the log-probability [N] (fp32) that position (rows[i], cols[i])
    of `input_ids` gives token targets[i] (positions may repeat): through the target-only head
    when the model has one (only those positions reach the vocabulary), else from the logits."""
    head = fused_head(model)
    if head is not None:
        return head_log_probs(model, head, inputs, rows, cols, targets)
    logits = model(**inputs).logits
    logits = logits[:, logits.size(1) - inputs["input_ids"].shape[1]:]  # after prompt tuning's virtual tokens
    picked = logits[rows.to(logits.device), cols.to(logits.device)].float()
    return picked.log_softmax(-1).gather(1, targets.to(logits.device)[:, None]).squeeze(1)


def token_log_probs(model: nn.Module, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one micro-batch: (the log-probability [N] (fp32, differentiable) of each target for
    the position before it, in row-major order; `is_target` [B, T-1], which positions those are),
    through the target-only head when the model has one, else from the full logits."""
    next_tokens = labels[..., 1:]
    is_target = next_tokens != IGNORE_INDEX
    targets = next_tokens[is_target]
    head = fused_head(model)
    if head is not None:
        return head_token_log_probs(model, head, inputs, is_target, targets), is_target
    logits = model_logits(model, inputs, labels)[..., :-1, :]
    picked = logits[is_target].float()
    return picked.log_softmax(-1).gather(1, targets.to(picked.device)[:, None]).squeeze(1), is_target
