"""Parallel strategies behind one interface (see base.py); `build_strategy` picks one."""

from __future__ import annotations

from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.parallel.base import Strategy


def resolve_strategy(cfg: Config, world_size: int) -> str:
    if cfg.parallel.strategy == "auto":
        return "fsdp" if world_size > 1 else "single"
    return cfg.parallel.strategy


def build_strategy(cfg: Config, dist_info: DistInfo) -> Strategy:
    name = resolve_strategy(cfg, dist_info.world_size)
    if name == "single":
        from trainer.parallel.single import SingleDevice

        if dist_info.world_size > 1:
            raise ValueError(f"parallel.strategy: single runs on one process, but the world has {dist_info.world_size}; use ddp, fsdp or zero1-3")
        return SingleDevice(cfg, dist_info)
    raise ValueError(f"parallel.strategy: {name} is not available yet")
