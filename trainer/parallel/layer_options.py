"""The per-decoder-layer options every strategy applies in one place, before its sharding
wrapper: sequence-parallel attention, activation checkpointing, compilation."""

from __future__ import annotations

import torch
from torch import nn

from trainer.config.schema import Config
from trainer.model.compile import compile_decoder_layers
from trainer.model.sequence_parallel import enable_sequence_parallel
from trainer.runtime.errors import ConfigError


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so it
    composes with FSDP2, DDP, DeepSpeed and frozen peft base weights)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"parallel.activation_checkpointing: {type(base).__name__} does not support it")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})



def apply_layer_options(model: nn.Module, cfg: Config, device: torch.device) -> None:
    """The per-decoder-layer options, in the order they compose: sequence-parallel attention
    inside the layer, activation checkpointing around the layer call, compilation of its
    forward. Before any sharding wrapper."""
    if cfg.parallel.sequence_parallel > 1:
        enable_sequence_parallel(model, cfg.parallel.sequence_parallel)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        compile_decoder_layers(model, device)
