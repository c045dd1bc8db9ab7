"""Evaluation: held-out loss per dataset, task metrics, and the forgetting monitor.

With rehearsal data mixed in, the general dataset's held-out loss is the forgetting
monitor: it should stay flat while the task's falls. Every evaluation, step 0
included, reports each dataset's `loss_change` against step 0, and a rise past
`logging.forgetting_warn` nats on a rehearsal set (the held-out part of any training
dataset but the one with the largest weight, which is the task) is warned about once
per dataset. The task's own eval loss may rise while its accuracy still improves (a
confident model pays more for each mistake), so it is not warned about. Chat and
instruction eval sets can also be answered greedily (`data.eval.generate`) and scored
with ROUGE-L, exact match and token F1; classification sets report accuracy and macro-F1.
"""

from __future__ import annotations

import logging
import math

import torch

from trainer.config import Config
from trainer.data.loader import RunData, build_eval_sets
from trainer.distributed import DistInfo, all_reduce_max, all_reduce_sum
from trainer.generate import HeldOutGeneration
from trainer.loss import forward_summed_loss, model_logits, summed_loss
from trainer.task_metrics import classification_scores

log = logging.getLogger("finetrain")


def to_device(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}


@torch.no_grad()
def evaluate(strategy, eval_sets: dict, task: str, num_labels: int = 2) -> dict:
    """Loss and perplexity (causal LM), or loss, accuracy and macro-F1 (classification),
    per eval dataset, over all ranks.

    Sharded models need every rank in every forward, so ranks with fewer batches
    repeat one with zero weight until all have run the same number of forwards."""
    model = strategy.model
    device = strategy.dist.device
    classification = task == "sequence_classification"
    was_training = model.training
    model.eval()
    results = {}
    for name, batches in eval_sets.items():
        count = torch.tensor([len(batches)], dtype=torch.int64)
        rounds = int(all_reduce_max(count).item())
        totals = torch.zeros(2, dtype=torch.float64)  # loss sum, targets
        confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)  # [true, predicted]
        for i in range(rounds):
            if not batches:
                break
            batch = batches[min(i, len(batches) - 1)]
            weight = 1.0 if i < len(batches) else 0.0
            labels, inputs = batch.labels.to(device), to_device(batch.inputs, device)
            with strategy.autocast():
                if classification:
                    logits = model_logits(model, inputs, labels)
                    loss = summed_loss(logits, labels, task)
                else:  # the training loss path: no full logits with the fused head
                    loss = forward_summed_loss(model, inputs, labels, task, batch.labels_shifted)
            totals[0] += weight * float(loss)
            totals[1] += weight * batch.num_targets
            if classification:
                pairs = labels.cpu() * num_labels + logits.argmax(-1).cpu()
                confusion += weight * torch.bincount(pairs, minlength=num_labels ** 2).reshape(num_labels, num_labels)
        if not batches and rounds:
            raise RuntimeError(f"eval set {name!r} has no batch on this rank while others have {rounds}")
        all_reduce_sum(totals)
        loss = float(totals[0] / max(totals[1], 1))
        results[f"eval/{name}/loss"] = loss
        if classification:
            all_reduce_sum(confusion)
            results.update({f"eval/{name}/{k}": v for k, v in classification_scores(confusion).items()})
        else:
            results[f"eval/{name}/perplexity"] = math.exp(min(loss, 50.0))
    model.train(was_training)
    return results


class ForgettingMonitor:
    """Each eval dataset's loss change since step 0, with one warning per rehearsal
    dataset once its loss rises past `warn_at` nats: that rise is forgetting."""

    def __init__(self, warn_at: float | None, rehearsal: set[str], is_main: bool):
        self.warn_at = warn_at
        self.rehearsal = rehearsal
        self.is_main = is_main
        self.baseline: dict[str, float] | None = None  # eval/<dataset>/loss at step 0
        self.warned: set[str] = set()

    def add_loss_change(self, step: int, results: dict) -> dict:
        """`results` with eval/<dataset>/loss_change added (0 at the baseline itself)."""
        if self.baseline is None:
            self.baseline = {k: v for k, v in results.items() if k.endswith("/loss")}
        changes = {}
        for key, initial in self.baseline.items():
            if key not in results:
                continue
            change = changes[f"{key}_change"] = results[key] - initial
            dataset = key.split("/")[1]
            if self.warn_at is None or change <= self.warn_at or dataset not in self.rehearsal or dataset in self.warned:
                continue
            self.warned.add(dataset)
            if self.is_main:
                log.warning("forgetting: eval loss of %s at step %d is %.4f nats above step 0 (%.4f -> %.4f), past "
                            "logging.forgetting_warn %g; a larger rehearsal weight or a lower optim.lr keeps it down",
                            dataset, step, change, initial, results[key], self.warn_at)
        return {**results, **changes}

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.baseline, self.warned = state["baseline"], set(state["warned"])


class Evaluator:
    """What one evaluation of the run measures, built from `data.eval`: held-out loss per
    dataset, the task metrics of generated answers, and the change since step 0."""

    def __init__(self, cfg: Config, rehearsal: tuple[str, ...], eval_sets: dict, generation: HeldOutGeneration | None,
                 is_main: bool):
        self.task = cfg.model.task
        self.num_labels = cfg.model.num_labels
        self.eval_sets = eval_sets
        self.generation = generation
        self.forgetting = ForgettingMonitor(cfg.logging.forgetting_warn, set(rehearsal), is_main)

    @classmethod
    def from_config(cls, cfg: Config, plan, tokenizer, data: RunData, dist_info: DistInfo) -> "Evaluator":
        eval_sets = build_eval_sets(cfg, tokenizer, plan.attention, dist_info.rank, dist_info.world_size, data)
        generation = HeldOutGeneration.from_config(cfg, tokenizer, dist_info.rank, data)
        return cls(cfg, plan.rehearsal_datasets, eval_sets, generation, dist_info.is_main)

    def run(self, strategy, step: int) -> tuple[dict, list[dict]]:
        """(eval/<dataset>/<metric> values, the generated answers); collective."""
        if not self.eval_sets:
            return {}, []
        results = evaluate(strategy, self.eval_sets, self.task, self.num_labels)
        generations: list[dict] = []
        if self.generation is not None:
            scores, generations = self.generation.run(strategy, step)
            results.update(scores)
        return self.forgetting.add_loss_change(step, results), generations
