"""Parallel strategies behind one interface (see base.py); `build_strategy` picks one.

Every key of `parallel.*` either works on the chosen strategy or is refused here,
before a model is built, with a message that says what to set instead.
"""

from __future__ import annotations

from trainer.config import Config

from trainer.errors import ConfigError
from trainer.distributed import DistInfo
from trainer.parallel.base import Strategy
from trainer.peft import peft_strategy_problem

SHARDED = ("fsdp", "zero1", "zero2", "zero3")


def resolve_strategy(cfg: Config, world_size: int) -> str:
    """`auto` is fsdp on more than one process, single on one."""
    if cfg.parallel.strategy == "auto":
        return "fsdp" if world_size > 1 else "single"
    return cfg.parallel.strategy


def check_strategy(cfg: Config, name: str, world_size: int) -> None:
    """Refuse a combination of keys that the strategy `name` cannot honour."""
    par = cfg.parallel
    picked = f"parallel.strategy {name}" + (" (picked by auto)" if par.strategy == "auto" else "")
    if name == "single" and world_size > 1:
        raise ConfigError(f"{picked} runs on one process, but the world has {world_size}; use ddp, fsdp or zero1-3")
    if par.offload == "optimizer" and name not in SHARDED:
        raise ConfigError(f"parallel.offload optimizer: {picked} keeps the whole optimizer on the device; "
                         "use fsdp or zero1-3 (both also run on one device)")
    if par.offload == "params" and name not in ("fsdp", "zero3"):
        raise ConfigError(f"parallel.offload params: {picked} does not shard parameters; use fsdp or zero3")
    if not par.reshard_after_forward and name == "zero3":
        raise ConfigError("parallel.reshard_after_forward false: zero3 always re-partitions parameters after "
                         "forward; use zero2 (or fsdp) to keep them gathered")
    if par.replicate > 1:
        if name != "fsdp":
            raise ConfigError(f"parallel.replicate: HSDP ({par.replicate} replicas) needs parallel.strategy fsdp; "
                              f"{picked} cannot replicate shard groups")
        if world_size % par.replicate:
            raise ConfigError(f"parallel.replicate: {par.replicate} replicas do not divide the world of "
                              f"{world_size} ranks into equal shard groups")
    if cfg.checkpoint.async_ and name.startswith("zero"):
        raise ConfigError(f"checkpoint.async: {picked} writes DeepSpeed's own checkpoint files, which it does "
                          "synchronously; use fsdp (or ddp, single) for background saves, or checkpoint.async=false")
    if cfg.model.quantization != "none" and name.startswith("zero"):
        raise ConfigError(f"model.quantization {cfg.model.quantization}: {picked} saves the 4-bit base with "
                          "bitsandbytes' quantization state in DeepSpeed's checkpoint, which DeepSpeed's loader "
                          "refuses, so the run could not resume; use fsdp (shards the 4-bit base), ddp or single")
    if par.deepspeed_config and not name.startswith("zero"):
        raise ConfigError(f"parallel.deepspeed_config: only read by zero1-3, not by {picked}")
    problem = peft_strategy_problem(cfg, name)
    if problem:
        raise ConfigError(problem)


def checked_strategy(cfg: Config, world_size: int) -> str:
    """The strategy the run uses; ConfigError when the config asks what it cannot do."""
    name = resolve_strategy(cfg, world_size)
    check_strategy(cfg, name, world_size)
    return name


def build_strategy(cfg: Config, dist_info: DistInfo) -> Strategy:
    name = checked_strategy(cfg, dist_info.world_size)
    if name == "single":
        from trainer.parallel.single import SingleDevice

        return SingleDevice(cfg, dist_info)
    if name == "ddp":
        from trainer.parallel.ddp import DDPStrategy

        return DDPStrategy(cfg, dist_info)
    if name == "fsdp":
        from trainer.parallel.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, dist_info)
    from trainer.parallel.zero import ZeroStrategy

    return ZeroStrategy(cfg, dist_info)
