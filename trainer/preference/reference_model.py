"""The reference model of the preference losses (`preference.reference`), without a second copy
of the model where none is needed.

- adapter: the trained model itself with its adapter switched off (trainer/peft/methods.py's
  `reference_adapter`): the base, or, for a run that continues an adapter (`peft.adapter_path`),
  the frozen copy of that adapter, never the bare base behind it.
- precomputed: the initial model's log-probabilities of every preference sequence of the run,
  training and held-out (trainer/preference/precompute.py), computed once before step 1.
- copy: a frozen second model, built as the trained one was at step 0 and sharded by the same
  strategy (`Strategy.frozen_copy`).
- auto: adapter where a peft adapter starts as the identity (every method but prompt learning,
  whose virtual tokens change the model from the start), precomputed otherwise.

A reference computes in evaluation mode (no dropout: the reference of step 1 is the policy of
step 1 exactly, and it does not move with the dropout mask) and without gradients.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch import nn

from trainer.config.schema import Config
from trainer.data.collate import Batch
from trainer.parallel.strategy import Strategy
from trainer.peft.methods import is_prompt_learning, reference_adapter
from trainer.preference.losses import REFERENCE_LOSSES
from trainer.preference.scoring import score_sequences


def reference_mode(cfg: Config) -> str | None:
    """The reference `cfg` trains against (None: its loss or task needs none)."""
    if cfg.model.task == "reward_model" or cfg.preference.loss not in REFERENCE_LOSSES:
        return None
    if cfg.preference.reference != "auto":
        return cfg.preference.reference
    return "adapter" if cfg.peft.method != "none" and not is_prompt_learning(cfg.peft.method) else "precomputed"


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """`model` in evaluation mode (dropout off), its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class AdapterReference:
    """The trained model with its adapter switched off."""

    def __init__(self, strategy: Strategy, task: str):
        self.strategy, self.task = strategy, task

    def log_probs(self, batch: Batch) -> torch.Tensor:
        strategy = self.strategy
        with torch.no_grad(), evaluating(strategy.model), reference_adapter(strategy.unwrapped_model()), \
                strategy.autocast():
            return score_sequences(strategy.model, batch, strategy.dist.device, self.task)[0].policy


class CopyReference:
    """A frozen copy of the initial model, sharded by the trained model's strategy."""

    def __init__(self, strategy: Strategy, make_model: Callable[[], nn.Module], task: str):
        self.strategy, self.task = strategy, task
        self.model = strategy.frozen_copy(make_model)

    def log_probs(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad(), self.strategy.autocast():
            return score_sequences(self.model, batch, self.strategy.dist.device, self.task)[0].policy


class PrecomputedReference:
    """The initial model's log-probabilities, looked up: {data set name: [examples, 2] array}."""

    def __init__(self, tables: dict[str, np.ndarray], device: torch.device):
        self.tables, self.device = tables, device

    def log_probs(self, batch: Batch) -> torch.Tensor:
        values = [self.tables[name][example, part] for name, example, part in batch.preference.keys]
        if not np.isfinite(values).all():
            name, example, part = batch.preference.keys[int(np.flatnonzero(~np.isfinite(values))[0])]
            raise RuntimeError(f"the precomputed reference has no log-probability for example {example} "
                               f"(sequence {part}) of {name}")
        return torch.tensor(values, dtype=torch.float32, device=self.device)
