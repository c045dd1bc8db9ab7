"""What a preference run optimises in one step, and what it reports.

The loss of an optimizer step is, over the step's micro-batches on all ranks,

    L = sum(unit losses) / units                         (units: pairs; KTO: completions)
      + w * sum(chosen NLL) / chosen target tokens       (w: preference.sft_weight; orpo: 1)
      + sum(rehearsal cross-entropy) / rehearsal targets (text, chat ... rows mixed in)

each term a mean over the whole step (the analogue of invariant 2: the counts are all-reduced
before the first backward, so micro-batch size, accumulation and world size leave the update as
it is; a pair is never split between micro-batches, trainer/data/preference_rows.py). The two losses
add: a rehearsal row weighs as a token of the language-model mean, a pair as a unit of the
preference mean, and `data.datasets.N.weight` decides how many of each a step holds.

Per step it reports, named as TRL names them: rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (trainer/preference/losses.py
says what a reward is for each loss), loss/preference, loss/lm and loss/nll where those terms
exist, kl (KTO's reference point) and pairs (units of the step).
"""

from __future__ import annotations

import math

import torch

from trainer.build import build_model
from trainer.config.schema import Config
from trainer.data.collate import Batch
from trainer.data.preference_rows import PREFERENCE_FORMATS
from trainer.data.run_data import RunData
from trainer.model.loss import forward_summed_loss
from trainer.parallel.strategy import Strategy
from trainer.preference.losses import Scored, UnitLosses, unit_losses
from trainer.preference.precompute import precompute_reference
from trainer.preference.reference_model import (AdapterReference, CopyReference, PrecomputedReference, evaluating,
                                          reference_mode)
from trainer.preference.scoring import language_model_targets, score_sequences, sequence_targets
from trainer.runtime import faults
from trainer.runtime.distributed import DistInfo, all_reduce_max, all_reduce_sum

# The sums a step (or an evaluation) reports from, in one vector (one all-reduce).
TALLY = ("preference", "lm", "nll", "chosen_reward", "rejected_reward", "chosen", "rejected", "correct", "margin",
         "pairs", "chosen_logp", "rejected_logp", "units", "lm_targets", "chosen_targets")


class _Tally:
    def __init__(self):
        self.values = torch.zeros(len(TALLY), dtype=torch.float64)

    def add(self, **sums) -> None:
        for key, value in sums.items():
            self.values[TALLY.index(key)] += float(value)

    def add_units(self, units: UnitLosses, scored: Scored) -> None:
        self.add(preference=units.losses.detach().double().sum(), units=len(units.losses),
                 chosen_reward=units.chosen_rewards.double().sum(),
                 rejected_reward=units.rejected_rewards.double().sum(),
                 chosen=len(units.chosen_rewards), rejected=len(units.rejected_rewards),
                 chosen_logp=units.chosen_logps.double().sum(), rejected_logp=units.rejected_logps.double().sum(),
                 nll=-scored.policy.detach()[scored.chosen].double().sum(),
                 chosen_targets=scored.tokens[scored.chosen].sum())
        if units.paired:
            self.add(correct=(units.chosen_rewards > units.rejected_rewards).sum(),
                     margin=(units.chosen_rewards - units.rejected_rewards).double().sum(), pairs=len(units.losses))

    def reduced(self) -> dict[str, float]:
        return dict(zip(TALLY, all_reduce_sum(self.values.clone()).tolist()))


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


class PreferenceObjective:
    """The loss and metrics of a preference run's steps (and of its preference eval sets)."""

    def __init__(self, cfg: Config, reference):
        self.cfg = cfg.preference
        self.task = cfg.model.task
        self.reference = reference  # None: the loss needs none
        self.kto = self.task != "reward_model" and self.cfg.loss == "kto"
        orpo = self.task != "reward_model" and self.cfg.loss == "orpo"
        self.nll_weight = 1.0 if orpo else 0.0 if self.task == "reward_model" else self.cfg.sft_weight
        self.counts: dict[str, float] = {}
        self.reference_point = 0.0
        self._tally = _Tally()
        self._pre_pass: dict[int, torch.Tensor] = {}  # KTO: each micro-batch's reference log-probabilities

    # ------------------------------------------------------------------ training
    def units(self, batch: Batch) -> int:
        if batch.preference is None:
            return 0
        return batch.preference.num_sequences if self.kto else batch.preference.num_pairs

    def begin_step(self, strategy: Strategy, batches: list[Batch]) -> None:
        """The step's counts over all ranks (and KTO's reference point): before the first backward."""
        local = torch.tensor([[language_model_targets(b), self.units(b),
                               int(sequence_targets(b)[b.preference.chosen].sum()) if b.preference is not None else 0]
                              for b in batches], dtype=torch.float64).sum(0)
        lm, units, chosen = all_reduce_sum(local).tolist()
        self.counts = {"lm_targets": lm, "units": units, "chosen_targets": chosen}
        self._tally = _Tally()
        self._pre_pass = {}
        self.reference_point = self._kto_reference_point(strategy, batches) if self.kto else 0.0

    def _kto_reference_point(self, strategy: Strategy, batches: list[Batch]) -> float:
        """KTO's z: the mean of log pi - log pi_ref over the step's completions on all ranks, at least 0,
        from a forward without gradients before the step's backward passes (the paper estimates it
        from mismatched completions instead, which costs as much)."""
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad(), evaluating(strategy.model), strategy.autocast():
            for batch in batches:
                if batch.preference is None:
                    continue
                reference = self._pre_pass[id(batch)] = self.reference.log_probs(batch)
                policy = score_sequences(strategy.model, batch, strategy.dist.device, self.task)[0].policy
                total += torch.tensor([float((policy - reference).double().sum()), len(policy)], dtype=torch.float64)
        total = all_reduce_sum(total)
        return max(0.0, float(total[0] / max(float(total[1]), 1.0)))

    def micro_batch_loss(self, strategy: Strategy, batch: Batch) -> torch.Tensor:
        """Forward one micro-batch: its share of the step's loss (what backward runs on)."""
        device, counts = strategy.dist.device, self.counts
        if batch.preference is None:  # rehearsal rows only
            labels = batch.labels.to(device)
            inputs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
            summed = forward_summed_loss(strategy.model, inputs, labels, "causal_lm", batch.labels_shifted)
            self._tally.add(lm=summed.detach().double(), lm_targets=batch.num_targets)
            return summed / max(counts["lm_targets"], 1.0)
        scored, others = score_sequences(strategy.model, batch, device, self.task)
        scored.reference = self._reference(batch)
        units = unit_losses(self.cfg, self.task, scored, self.reference_point)
        share = units.losses.sum() / max(counts["units"], 1.0)
        if others.numel():
            share = share - others.sum() / max(counts["lm_targets"], 1.0)
            self._tally.add(lm=-others.detach().double().sum(), lm_targets=others.numel())
        if self.nll_weight:
            share = share - self.nll_weight * scored.policy[scored.chosen].sum() / max(counts["chosen_targets"], 1.0)
        self._tally.add_units(units, scored)
        return share

    def _reference(self, batch: Batch) -> torch.Tensor | None:
        if self.reference is None:
            return None
        cached = self._pre_pass.pop(id(batch), None)
        return cached if cached is not None else self.reference.log_probs(batch)

    def step_metrics(self) -> dict[str, float]:
        """The step's rewards and losses, over all ranks (collective)."""
        metrics = self._metrics(self._tally.reduced())
        if self.kto:
            metrics["kl"] = self.reference_point
        return metrics

    def _metrics(self, t: dict[str, float]) -> dict[str, float]:
        metrics = {"loss/preference": _ratio(t["preference"], t["units"]),
                   "rewards/chosen": _ratio(t["chosen_reward"], t["chosen"]),
                   "rewards/rejected": _ratio(t["rejected_reward"], t["rejected"]),
                   "pairs": int(t["units"])}
        metrics["rewards/margins"] = _ratio(t["margin"], t["pairs"]) if t["pairs"] else \
            metrics["rewards/chosen"] - metrics["rewards/rejected"]
        if t["pairs"]:
            metrics["rewards/accuracies"] = t["correct"] / t["pairs"]
        if self.task != "reward_model":
            metrics["logps/chosen"] = _ratio(t["chosen_logp"], t["chosen"])
            metrics["logps/rejected"] = _ratio(t["rejected_logp"], t["rejected"])
        if t["lm_targets"]:
            metrics["loss/lm"] = t["lm"] / t["lm_targets"]
        if self.nll_weight:
            metrics["loss/nll"] = _ratio(t["nll"], t["chosen_targets"])
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, strategy: Strategy, batches: list[Batch]) -> dict[str, float]:
        """An eval set of preference data: its loss (the preference loss's mean, plus the chosen NLL
        where the run adds it), rewards/accuracies, rewards/margins, rewards/chosen and
        rewards/rejected, over all ranks. A rank with fewer micro-batches repeats one, unused,
        so that sharded forwards stay together."""
        rounds = int(all_reduce_max(torch.tensor([len(batches)], dtype=torch.int64)).item())
        scored: list[Scored] = []
        device = strategy.dist.device
        with evaluating(strategy.model), strategy.autocast():
            for i in range(rounds):
                batch = batches[min(i, len(batches) - 1)]
                with_reference = self.reference.log_probs(batch) if self.reference is not None else None
                sequences = score_sequences(strategy.model, batch, device, self.task)[0]
                if i < len(batches):
                    sequences.reference = with_reference
                    scored.append(sequences)
        point = 0.0
        if self.kto:
            total = torch.tensor([sum(float((s.policy - s.reference).double().sum()) for s in scored),
                                  sum(len(s.policy) for s in scored)], dtype=torch.float64)
            total = all_reduce_sum(total)
            point = max(0.0, float(total[0] / max(float(total[1]), 1.0)))
        tally = _Tally()
        for sequences in scored:
            tally.add_units(unit_losses(self.cfg, self.task, sequences, point), sequences)
        t = tally.reduced()
        metrics = self._metrics(t)
        loss = metrics.pop("loss/preference")
        if self.nll_weight:
            loss += self.nll_weight * metrics.pop("loss/nll")
        metrics.pop("pairs")
        return {"loss": loss if math.isfinite(loss) else float("nan"), **metrics}


def build_objective(cfg: Config, plan, strategy: Strategy, data: RunData, tokenizer,
                    dist_info: DistInfo, total_steps: int) -> PreferenceObjective | None:
    """The objective of a run that trains preference data (None for one that does not), with its
    reference model: call it with the strategy's model as it is at step 0 (before a resume loads a
    checkpoint), which the `precomputed` pass and the `copy` reference start from."""
    if not any(ds.format in PREFERENCE_FORMATS for ds in cfg.data.datasets):
        return None
    mode, task = reference_mode(cfg), cfg.model.task
    reference = None
    if mode == "adapter":
        reference = AdapterReference(strategy, task)
    elif mode == "copy":
        reference = CopyReference(strategy, lambda: build_model(cfg, tokenizer, plan.attention, total_steps), task)
    elif mode == "precomputed":
        with faults.long_phase("reference", 0):
            tables = precompute_reference(cfg, strategy, data, tokenizer, plan.attention, dist_info)
        reference = PrecomputedReference(tables, dist_info.device)
    return PreferenceObjective(cfg, reference)
