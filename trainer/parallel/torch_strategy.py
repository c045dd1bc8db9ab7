"""The strategies built on torch's own optimizer (single, ddp, fsdp): their step, clipping,
checkpoint files through DCP and per-device memory accounting."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from trainer.config.capabilities import (ASYNC_SAVE, COMPILE, KEEP_GATHERED, MULTI_PROCESS, QUANTIZATION,
                                         SEQUENCE_PARALLEL, WHOLE_BASE_WEIGHTS, WHOLE_GRADIENTS)
from trainer.config.schema import Config
from trainer.model.quantization import without_quantized_weights
from trainer.optim import ADAM_MOMENTS, build_optimizer, build_scheduler
from trainer.parallel.dcp import BackgroundWriter, dcp_load, dcp_save, dcp_save_async
from trainer.parallel.safe_load import load_plain
from trainer.parallel.strategy import Strategy
from trainer.peft.methods import adapter_training_state, after_optimizer_step, load_adapter_training_state


def gathered_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) model state on rank 0's CPU, without frozen 4-bit weights; empty on other ranks."""
    return without_quantized_weights(
        model, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def clip_and_norm(parameters, max_norm: float) -> float:
    """Global gradient norm before clipping; clip when max_norm > 0 (DTensor-aware)."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=False)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


ADAPTER_STATE = "adapter_state.pt"


class TorchStrategy(Strategy):
    """single, ddp and fsdp: a torch optimizer over the (possibly sharded) parameters,
    gradients clipped DTensor-aware, state in DCP. Subclasses wrap the model in `setup`."""

    checkpoint_format = "dcp"
    supports = frozenset({MULTI_PROCESS, ASYNC_SAVE, QUANTIZATION, COMPILE, KEEP_GATHERED, SEQUENCE_PARALLEL,
                          WHOLE_GRADIENTS, WHOLE_BASE_WEIGHTS})

    @classmethod
    def memory(cls, name: str, shape, size, acts: int, cfg: Config, world: int) -> dict:
        """A whole replica per rank: weights, gradients and AdamW moments, unsharded."""
        params = (shape.total - size.quantized) * size.master + size.packed + size.constants
        moments = ADAM_MOMENTS * shape.trainable * size.master
        return {"params": params, "gathered": 0, "grads": shape.trainable * size.master, "optimizer": moments,
                "host": 0, "saved": params + moments}

    @classmethod
    def load_weights(cls, checkpoint: Path, model: nn.Module) -> None:
        dcp_load(checkpoint, model)

    def build_optimizer(self, model: nn.Module, total_steps: int) -> None:
        self.optimizer = build_optimizer(model, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, total_steps)

    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.compute_dtype(),
                              enabled=self.compute_dtype() != torch.float32)

    def backward(self, loss: torch.Tensor) -> None:
        # DDP's all-reduce and FSDP's reduce-scatter average over ranks; the loss is already
        # divided by the global target count, so the sum over ranks is the gradient we want.
        (loss * self.dist.world_size).backward()

    def step(self, skip: bool = False) -> float:
        norm = clip_and_norm(self.model.parameters(), self.cfg.optim.max_grad_norm)
        if not skip and math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
            after_optimizer_step(self.unwrapped_model(), self.scheduler.last_epoch - 1)  # e.g. AdaLoRA's rank budget
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, path: Path) -> None:
        dcp_save(path, self.unwrapped_model(), self.optimizer)
        self._save_adapter_state(path)

    def save_async(self, path: Path, writer: BackgroundWriter):
        future = dcp_save_async(path, self.unwrapped_model(), self.optimizer, writer)
        self._save_adapter_state(path)
        return future

    def load(self, path: Path) -> None:
        dcp_load(path, self.unwrapped_model(), self.optimizer)
        state_file = path / ADAPTER_STATE
        if state_file.is_file():
            load_adapter_training_state(self.unwrapped_model(), load_plain(state_file, str(state_file)))

    def _save_adapter_state(self, path: Path) -> None:
        """The adapter method's own training state (AdaLoRA's importance averages), the same on
        every rank of the strategies that train such methods: written by rank 0."""
        state = adapter_training_state(self.unwrapped_model())
        if state is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            torch.save(state, path / ADAPTER_STATE)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return gathered_model_state(self.unwrapped_model())
