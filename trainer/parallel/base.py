"""The one small interface every parallel strategy implements.

The loop only ever talks to a `Strategy`: it builds the model through it, runs
forward through `strategy.model`, calls `backward` on the step-normalised loss,
`no_sync` around every micro-batch but the last, and `step` once per optimizer
step. Checkpoint files and HF export go through `save`/`load`/`full_state_dict`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainer.config import Config
from trainer.distributed import DistInfo


class Strategy(ABC):
    name: str = ""

    def __init__(self, cfg: Config, dist_info: DistInfo):
        self.cfg = cfg
        self.dist = dist_info
        self.model: nn.Module | None = None  # wrapped model; call it for forward
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    # ------------------------------------------------------------------ set-up
    def build_model(self, make_model: Callable[[], nn.Module]) -> nn.Module:
        """Build the (peft-wrapped) model; zero3 builds it already partitioned."""
        return make_model()

    @abstractmethod
    def setup(self, model: nn.Module, total_steps: int) -> None:
        """Apply parallelism + activation checkpointing, build optimizer and scheduler."""

    # ------------------------------------------------------------------ train step
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.parallel.mixed_precision == "bf16" else torch.float32

    def autocast(self):
        """Mixed-precision context for forward (strategies that cast params themselves return nullcontext)."""
        return contextlib.nullcontext()

    def generation(self):
        """Context for greedy generation, which runs one forward per new token: sharding
        strategies gather the parameters once for all of them."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already divided by the global target count of the step.
        Implementations undo any gradient averaging their engine applies over ranks
        or accumulation steps, so the update equals the gradient of the global mean."""

    def no_sync(self):
        """Context for micro-batches whose gradients need not be reduced yet."""
        return contextlib.nullcontext()

    @abstractmethod
    def step(self) -> float:
        """Clip (optim.max_grad_norm), optimizer step, scheduler step, zero grads;
        return the global gradient norm before clipping."""

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ state
    @abstractmethod
    def save(self, path: Path) -> None:
        """Write model + optimizer + scheduler state into folder `path` (collective)."""

    def save_async(self, path: Path, writer) -> "concurrent.futures.Future":
        """Like `save`, but return once the state is copied aside; the future completes when
        this rank's files are written. Only strategies that save through DCP have it."""
        raise NotImplementedError(f"{self.name} saves synchronously")

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore what `save` wrote, possibly at another world size (collective)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded model state dict (peft names included; frozen 4-bit weights left out),
        on CPU, on rank 0; an empty dict on other ranks (collective)."""

    def unwrapped_model(self) -> nn.Module:
        return self.model

    def local_weights(self) -> list[torch.Tensor]:
        """This rank's part of the trainable weights (its shards, where they are sharded):
        what a checkpoint is checked for NaN and inf before it is written."""
        return [p.to_local() if hasattr(p, "to_local") else p
                for p in self.unwrapped_model().parameters() if p.requires_grad]
