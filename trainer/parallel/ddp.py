"""DistributedDataParallel: a full replica per rank, gradients all-reduced in backward."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.config.capabilities import OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS
from trainer.parallel.layer_options import apply_layer_options
from trainer.parallel.torch_strategy import TorchStrategy


class DDPStrategy(TorchStrategy):
    names = ("ddp",)
    why_not = {OFFLOAD_OPTIMIZER: "keeps the whole optimizer on the device",
               OFFLOAD_PARAMS: "does not shard parameters"}

    def setup(self, model: nn.Module, total_steps: int) -> None:
        model.to(self.dist.device)
        apply_layer_options(model, self.cfg, self.dist.device)
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers here, so every replica starts equal.
        # Gradients live in the all-reduce buckets themselves (no second copy).
        self.model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        self.build_optimizer(model, total_steps)

    def no_sync(self):
        return self.model.no_sync()

    def unwrapped_model(self) -> nn.Module:
        return self.model.module
