"""AdamW with decay/no-decay groups and warmup + cosine/linear/constant schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimConfig

from trainer.errors import ConfigError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Biases, norms and embeddings are not decayed (decay would shrink them toward zero
    for no regularisation benefit); every other trainable matrix is."""
    decay, no_decay = [], []
    no_decay_ids = set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.Embedding)) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            # ZeRO-3 partitioned parameters are empty 1-D tensors; ds_shape is the real one.
            if is_norm or len(getattr(param, "ds_shape", param.shape)) < 2 or name == "bias":
                no_decay_ids.add(id(param))
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if id(param) in no_decay_ids else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("peft.target_modules: the model has no trainable parameters (check peft.method and peft.target_modules)")
    # foreach=False keeps CPU and DTensor behaviour identical across strategies.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The factor on optim.lr at optimizer step `step` (0-based) of `total_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.scheduler == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.scheduler == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, total_steps))
