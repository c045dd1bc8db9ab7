"""Held-out loss per dataset. With rehearsal data mixed in, the general dataset's
held-out loss is the forgetting monitor: it should stay flat while the task's falls."""

from __future__ import annotations

import math

import torch

from trainer.distributed import all_reduce_max, all_reduce_sum
from trainer.loss import forward_summed_loss, model_logits, summed_loss


def to_device(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}


@torch.no_grad()
def evaluate(strategy, eval_sets: dict, task: str) -> dict:
    """Loss (and perplexity or accuracy) per eval dataset, over all ranks.

    Sharded models need every rank in every forward, so ranks with fewer batches
    repeat one with zero weight until all have run the same number of forwards."""
    model = strategy.model
    device = strategy.dist.device
    was_training = model.training
    model.eval()
    results = {}
    for name, batches in eval_sets.items():
        count = torch.tensor([len(batches)], dtype=torch.int64)
        rounds = int(all_reduce_max(count).item())
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, targets, correct
        for i in range(rounds):
            if not batches:
                break
            batch = batches[min(i, len(batches) - 1)]
            weight = 1.0 if i < len(batches) else 0.0
            labels, inputs = batch.labels.to(device), to_device(batch.inputs, device)
            with strategy.autocast():
                if task == "sequence_classification":
                    logits = model_logits(model, inputs, labels)
                    totals[2] += weight * float((logits.argmax(-1) == labels).sum())
                    loss = summed_loss(logits, labels, task)
                else:  # the training loss path: no full logits with the fused head
                    loss = forward_summed_loss(model, inputs, labels, task)
            totals[0] += weight * float(loss)
            totals[1] += weight * batch.num_targets
        if not batches and rounds:
            raise RuntimeError(f"eval set {name!r} has no batch on this rank while others have {rounds}")
        all_reduce_sum(totals)
        loss = float(totals[0] / max(totals[1], 1))
        results[f"eval/{name}/loss"] = loss
        if task == "sequence_classification":
            results[f"eval/{name}/accuracy"] = float(totals[2] / max(totals[1], 1))
        else:
            results[f"eval/{name}/perplexity"] = math.exp(min(loss, 50.0))
    model.train(was_training)
    return results
