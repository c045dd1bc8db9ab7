"""One process, one device: the reference every other strategy must match."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel.base import Strategy
from trainer.parallel.common import (
    apply_activation_checkpointing,
    clip_and_norm,
    dcp_load,
    dcp_save,
    gathered_model_state,
)


class SingleDevice(Strategy):
    name = "single"

    def setup(self, model: nn.Module, total_steps: int) -> None:
        model.to(self.dist.device)
        if self.cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.model = model
        self.optimizer = build_optimizer(model, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, total_steps)

    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.compute_dtype(),
                              enabled=self.compute_dtype() != torch.float32)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = clip_and_norm(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, path: Path) -> None:
        dcp_save(path, self.model, self.optimizer, self.scheduler)

    def load(self, path: Path) -> None:
        dcp_load(path, self.model, self.optimizer, self.scheduler)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return gathered_model_state(self.model)
