"""One process, one device: the reference every other strategy must match."""

from __future__ import annotations

from torch import nn

from trainer.config.capabilities import MULTI_PROCESS, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, SEQUENCE_PARALLEL
from trainer.parallel.layer_options import apply_layer_options
from trainer.parallel.torch_strategy import TorchStrategy


class SingleDevice(TorchStrategy):
    names = ("single",)
    supports = TorchStrategy.supports - {MULTI_PROCESS, SEQUENCE_PARALLEL}
    why_not = {MULTI_PROCESS: "runs on one process", OFFLOAD_OPTIMIZER: "keeps the whole optimizer on the device",
               OFFLOAD_PARAMS: "does not shard parameters", SEQUENCE_PARALLEL: "runs on one process"}

    def setup(self, model: nn.Module, total_steps: int) -> None:
        model.to(self.dist.device)
        apply_layer_options(model, self.cfg, self.dist.device)
        self.model = model
        self.build_optimizer(model, total_steps)
