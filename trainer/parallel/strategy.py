"""The one small interface every parallel strategy implements, and how a strategy describes itself.

The loop only ever talks to a `Strategy`: it builds the model through it, runs
forward through `strategy.model`, calls `backward` on the step-normalised loss,
`no_sync` around every micro-batch but the last, and `step` once per optimizer
step. Checkpoint files and HF export go through `save`/`load`/`full_state_dict`.

A strategy also says, as class attributes, which `parallel.strategy` names it serves,
what its checkpoints hold and which keys it honours (`supports`, with `why_not` for the
ones it refuses); the registry (`trainer/parallel/registry.py`) turns that into the run
plan's refusals. `memory` is its per-device memory for `finetrain estimate`, and
`load_weights` is how export reads its checkpoints in one process.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from trainer.config.schema import Config
from trainer.runtime.distributed import DistInfo

if TYPE_CHECKING:
    from concurrent.futures import Future

    from trainer.config.plan_types import RunPlan


class Strategy(ABC):
    names: tuple[str, ...] = ()  # the values of parallel.strategy it serves
    checkpoint_format: str = "dcp"  # what its checkpoints hold; the COMPLETE mark records it
    supports: frozenset = frozenset()  # capabilities it honours (see `requested`)
    why_not: dict[str, str] = {}  # capability -> why it is refused (default: "cannot honour it")

    def __init__(self, cfg: Config, dist_info: DistInfo, plan: "RunPlan"):
        self.cfg = cfg
        self.dist = dist_info
        self.plan = plan
        self.name = plan.strategy
        self.model: nn.Module | None = None  # wrapped model; call it for forward
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    @classmethod
    def config_problems(cls, cfg: Config, world_size: int) -> list[str]:
        """Refusals that its declared capabilities cannot express (e.g. a mesh that does not divide)."""
        return []

    @classmethod
    @abstractmethod
    def memory(cls, name: str, shape, size, acts: int, cfg: Config, world: int) -> dict:
        """Per-device bytes on `world` devices (trainer/estimate/), `size` the bytes per element (`ElementSizes`): `params` (including
        `gathered`, the weights all-gathered for compute at the busiest moment), `grads`,
        `optimizer`, `host` (what offload keeps in host memory instead) and `saved` (the
        bytes of this rank's checkpointed state)."""

    @classmethod
    @abstractmethod
    def load_weights(cls, checkpoint: Path, model: nn.Module) -> None:
        """Load the trained weights of one of its checkpoints into a freshly built (unwrapped)
        model, in one process (export)."""

    # ------------------------------------------------------------------ set-up
    def build_model(self, make_model: Callable[[], nn.Module]) -> nn.Module:
        """Build the (peft-wrapped) model; zero3 builds it already partitioned."""
        return make_model()

    @abstractmethod
    def setup(self, model: nn.Module, total_steps: int) -> None:
        """Apply parallelism + activation checkpointing, build optimizer and scheduler."""

    def frozen_copy(self, make_model: Callable[[], nn.Module]) -> nn.Module:
        """A second model for forward only (preference tuning's `copy` reference), frozen, in
        evaluation mode, placed as this strategy places the trained one (sharded where it shards
        it) and computing in its compute dtype, with no gradient or optimizer state. Here: a whole
        copy on the device (single, ddp: a frozen model needs no gradient reduction)."""
        model = self.build_model(make_model)
        model.requires_grad_(False)
        return model.to(self.dist.device).eval()

    # ------------------------------------------------------------------ train step
    def compute_dtype(self) -> torch.dtype:
        return self.plan.compute_dtype

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
    def step(self, skip: bool = False) -> float:
        """Clip (optim.max_grad_norm), optimizer step, scheduler step, zero grads; return the
        global gradient norm before clipping. When `skip` (the step's loss was not finite) or the
        norm is not finite, the update is dropped: gradients zeroed, optimizer and scheduler left
        as they were. The norm is global, so every rank drops the same steps."""

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ state
    @abstractmethod
    def save(self, path: Path) -> None:
        """Write model + optimizer state into folder `path` (collective)."""

    def save_async(self, path: Path, writer) -> "Future":
        """Like `save`, but return once the state is copied aside; the future completes when
        this rank's files are written. Only strategies that support ASYNC_SAVE have it."""
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
