"""One process, one device: the reference every other strategy must match."""

from __future__ import annotations

from torch import nn

from trainer.parallel.common import TorchStrategy, apply_layer_options


class SingleDevice(TorchStrategy):
    name = "single"

    def setup(self, model: nn.Module, total_steps: int) -> None:
        model.to(self.dist.device)
        apply_layer_options(model, self.cfg, self.dist.device)
        self.model = model
        self.build_optimizer(model, total_steps)
