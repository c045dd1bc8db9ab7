"""Evaluation: held-out loss per dataset, task metrics, benchmark accuracy, and the
forgetting monitor.

With rehearsal data mixed in, the general dataset's held-out loss is the forgetting
monitor: it should stay flat while the task's falls. Every evaluation, step 0
included, reports each dataset's `loss_change` against step 0 (and each choice set's
`acc_change` and `acc_norm_change`), and a forgetting check (trainer/data/eval_sets.py: the
held-out part of any training dataset but the one with the largest weight, which is the
task, and the sets marked `forgetting`) is warned about once per set when its loss rises,
or its accuracy drops, by more than its margin. The task's own eval loss may rise while
its accuracy still improves (a confident model pays more for each mistake), so it is not
warned about. Chat and instruction eval sets can also be answered greedily
(`data.eval.generate`) and scored with the set's metrics; classification sets report
accuracy and macro-F1; choice sets (trainer/eval/multiple_choice.py) `acc` and `acc_norm`.
"""

from __future__ import annotations

import logging
import math

import torch

from trainer.config.schema import Config
from trainer.data.eval_batches import build_eval_sets
from trainer.data.eval_sets import forgetting_checks
from trainer.data.run_data import RunData
from trainer.eval.generation import HeldOutGeneration
from trainer.eval.multiple_choice import ChoiceSet, build_choice_sets, evaluate_choice_set
from trainer.eval.scores import classification_scores
from trainer.model.loss import forward_summed_loss, model_logits, summed_loss
from trainer.preference.objective import PreferenceObjective
from trainer.runtime.distributed import DistInfo, all_reduce_max, all_reduce_sum

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
    """Each eval set's loss change (and each choice set's accuracy change) since step 0, with
    one warning per forgetting check once its loss rises, or its accuracy (`acc`) drops, by
    more than its margin."""

    def __init__(self, margins: dict[str, float | None], is_main: bool):
        self.margins = margins  # forgetting checks: set name -> margin (None: never warn)
        self.is_main = is_main
        self.baseline: dict[str, float] | None = None  # eval/<set>/loss, acc, acc_norm at step 0
        self.warned: set[str] = set()

    def add_changes(self, step: int, results: dict) -> dict:
        """`results` with eval/<set>/loss_change, acc_change and acc_norm_change added (0 at
        the baseline itself)."""
        if self.baseline is None:
            self.baseline = {k: v for k, v in results.items() if k.endswith(("/loss", "/acc", "/acc_norm"))}
        changes = {}
        for key, initial in self.baseline.items():
            if key not in results:
                continue
            change = changes[f"{key}_change"] = results[key] - initial
            dataset, metric = key.split("/")[1:3]
            margin = self.margins.get(dataset)
            worse = change if metric == "loss" else -change
            if metric == "acc_norm" or margin is None or worse <= margin or dataset in self.warned:
                continue
            self.warned.add(dataset)
            if not self.is_main:
                continue
            if metric == "loss":
                log.warning("forgetting: eval loss of %s at step %d is %.4f nats above step 0 (%.4f -> %.4f), past "
                            "its margin %g; a larger rehearsal weight or a lower optim.lr keeps it down",
                            dataset, step, change, initial, results[key], margin)
            else:
                log.warning("forgetting: accuracy of %s at step %d is %.4f below step 0 (%.4f -> %.4f), past its "
                            "margin %g; a larger rehearsal weight or a lower optim.lr keeps it up",
                            dataset, step, -change, initial, results[key], margin)
        return {**results, **changes}

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.baseline, self.warned = state["baseline"], set(state["warned"])


class Evaluator:
    """What one evaluation of the run measures, built from `data.eval`: held-out loss per
    dataset, the task metrics of generated answers, the accuracy of choice sets, the preference loss, reward
    accuracy and margin of preference sets, and the change since step 0."""

    def __init__(self, cfg: Config, eval_sets: dict, generation: HeldOutGeneration | None, is_main: bool,
                 choice_sets: dict[str, ChoiceSet] | None = None):
        self.task = cfg.model.task
        self.num_labels = cfg.model.num_labels
        self.eval_sets = eval_sets
        self.choice_sets = choice_sets or {}
        self.generation = generation
        self.forgetting = ForgettingMonitor(forgetting_checks(cfg), is_main)
        # A run that trains preference data scores its preference eval sets with its loss (set by the trainer).
        self.objective: PreferenceObjective | None = None

    @classmethod
    def from_config(cls, cfg: Config, plan, tokenizer, data: RunData, dist_info: DistInfo) -> "Evaluator":
        eval_sets = build_eval_sets(cfg, tokenizer, plan.attention, dist_info.rank, dist_info.world_size, data)
        choice_sets = build_choice_sets(cfg, tokenizer, plan.attention)
        generation = HeldOutGeneration.from_config(cfg, tokenizer, dist_info.rank, data)
        return cls(cfg, eval_sets, generation, dist_info.is_main, choice_sets)

    def run(self, strategy, step: int) -> tuple[dict, list[dict]]:
        """(eval/<dataset>/<metric> values, the generated answers); collective."""
        if not self.eval_sets and not self.choice_sets:
            return {}, []
        preference = {name: batches for name, batches in self.eval_sets.items()
                      if batches and batches[0].preference is not None}
        scored_by_loss = {name: batches for name, batches in self.eval_sets.items() if name not in preference}
        results = evaluate(strategy, scored_by_loss, self.task, self.num_labels) if scored_by_loss else {}
        for name, batches in preference.items():  # loss, rewards/accuracies, rewards/margins, ...
            results.update({f"eval/{name}/{k}": v for k, v in self.objective.evaluate(strategy, batches).items()})
        for name, choice_set in self.choice_sets.items():
            results.update({f"eval/{name}/{k}": v for k, v in evaluate_choice_set(strategy, choice_set).items()})
        generations: list[dict] = []
        if self.generation is not None:
            scores, generations = self.generation.run(strategy, step)
            results.update(scores)
        return self.forgetting.add_changes(step, results), generations
