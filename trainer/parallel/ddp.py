"""DistributedDataParallel: a full replica per rank, gradients all-reduced in backward."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel.base import Strategy
from trainer.parallel.common import (
    apply_activation_checkpointing,
    clip_and_norm,
    dcp_load,
    dcp_save,
    gathered_model_state,
)


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, model: nn.Module, total_steps: int) -> None:
        model.to(self.dist.device)
        if self.cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers here, so every replica starts equal.
        # Gradients live in the all-reduce buckets themselves (no second copy).
        self.model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        self.optimizer = build_optimizer(model, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, total_steps)

    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.compute_dtype(),
                              enabled=self.compute_dtype() != torch.float32)

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; the loss is already divided by the global
        # target count, so the sum over ranks is the gradient we want.
        (loss * self.dist.world_size).backward()

    def no_sync(self):
        return self.model.no_sync()

    def step(self) -> float:
        # Gradients are identical on every rank after the all-reduce: the local norm is global.
        norm = clip_and_norm(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, path: Path) -> None:
        dcp_save(path, self.unwrapped_model(), self.optimizer, self.scheduler)

    def load(self, path: Path) -> None:
        dcp_load(path, self.unwrapped_model(), self.optimizer, self.scheduler)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return gathered_model_state(self.unwrapped_model())

    def unwrapped_model(self) -> nn.Module:
        return self.model.module
