"""What finetrain reads off a model's structure: its repeated decoder layers and its
parameter counts."""

from __future__ import annotations

from torch import nn

import trainer.model.attention  # noqa: F401  registers the "varlen_reference" attention
from trainer.model.quantization import logical_numel
from trainer.runtime.errors import ConfigError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (Llama `model.layers`, BERT `encoder.layer`, ...):
    the longest ModuleList whose members all share one class, looked up through any peft
    wrapper. These are the units of per-layer FSDP sharding and activation checkpointing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    best: list[nn.Module] = []
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if len({type(layer) for layer in module}) == 1:
                best = list(module)
    if not best:
        raise ConfigError(f"model: {type(base).__name__} has no repeated transformer blocks to shard or checkpoint")
    return best



def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; correct for sharded (DTensor), ZeRO-3-partitioned
    (ds_numel) and packed 4-bit parameters alike."""

    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
