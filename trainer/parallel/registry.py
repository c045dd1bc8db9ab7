"""The registry of parallel strategies: each module of this package is one strategy, which
describes itself (trainer/parallel/strategy.py); nothing outside this package names one.

Adding a strategy: a module with a `Strategy` subclass declaring its `names`,
`checkpoint_format`, `supports`, `memory` and `load_weights`, listed in STRATEGY_CLASSES.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config.capabilities import (ASYNC_SAVE, COMPILE, DEEPSPEED_CONFIG, KEEP_GATHERED, MULTI_PROCESS,
                                         OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, QUANTIZATION, REPLICATE, SEQUENCE_PARALLEL)
from trainer.config.schema import Config
from trainer.parallel.ddp import DDPStrategy
from trainer.parallel.fsdp import FSDPStrategy
from trainer.parallel.single import SingleDevice
from trainer.parallel.strategy import Strategy
from trainer.parallel.zero import Zero1, Zero2, Zero3
from trainer.peft.methods import strategy_needs
from trainer.runtime.distributed import DistInfo
from trainer.runtime.errors import ConfigError

STRATEGY_CLASSES: tuple[type[Strategy], ...] = (SingleDevice, DDPStrategy, FSDPStrategy, Zero1, Zero2, Zero3)
REGISTRY: dict[str, type[Strategy]] = {name: cls for cls in STRATEGY_CLASSES for name in cls.names}
# `parallel.strategy: auto`: one process trains as it would alone; more shard the model.
AUTO = {False: SingleDevice.names[0], True: FSDPStrategy.names[0]}


def strategy_names() -> list[str]:
    return list(REGISTRY)


def resolve_strategy(cfg: Config, world_size: int) -> str:
    """The strategy name a config means on `world_size` ranks (`auto` resolved)."""
    if cfg.parallel.strategy == "auto":
        return AUTO[world_size > 1]
    return cfg.parallel.strategy


def strategy_problems(cfg: Config, name: str, world_size: int) -> list[str]:
    """Why strategy `name` cannot run `cfg` on `world_size` ranks, one line per key (none: it can)."""
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return [f"parallel.strategy: {name!r} is not one of auto, {', '.join(REGISTRY)}{hint}"]
    cls = REGISTRY[name]
    who = name + (" (picked by auto)" if cfg.parallel.strategy == "auto" else "")
    problems = []
    for request in requested(cfg, world_size):
        if request.capability in cls.supports:
            continue
        able = [other for other, other_cls in REGISTRY.items() if request.capability in other_cls.supports]
        why = cls.why_not.get(request.capability, "cannot honour it")
        if request.capability == MULTI_PROCESS:
            line = f"parallel.strategy: {who} {why}, but the world has {world_size} ranks"
        elif request.need:
            line = f"{request.key}: {request.need}, but parallel.strategy {who} {why}"
        else:
            line = f"{request.key}: parallel.strategy {who} {why}"
        problems.append(line + (f"; use {one_of(able)}" if able else ""))
    return problems + cls.config_problems(cfg, world_size)


def one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def strategy_class(name: str) -> type[Strategy]:
    return REGISTRY[name]


def strategy_for_format(checkpoint_format: str) -> type[Strategy]:
    """The strategy class that reads checkpoints of `checkpoint_format` (export)."""
    for cls in STRATEGY_CLASSES:
        if cls.checkpoint_format == checkpoint_format:
            return cls
    raise ConfigError(f"checkpoint format {checkpoint_format!r} is not one finetrain writes "
                      f"({', '.join(sorted({c.checkpoint_format for c in STRATEGY_CLASSES}))})")


def build_strategy(cfg: Config, dist_info: DistInfo, plan) -> Strategy:
    return REGISTRY[plan.strategy](cfg, dist_info, plan)


@dataclass(frozen=True)
class Request:
    capability: str
    key: str  # the config key that asks for it, as messages name it
    need: str | None = None  # why the config needs it, where the key alone does not say



def requested(cfg: Config, world_size: int) -> list[Request]:
    """What `cfg` asks of its strategy on `world_size` ranks."""

    par = cfg.parallel
    asked = {
        MULTI_PROCESS: world_size > 1,
        OFFLOAD_OPTIMIZER: par.offload == "optimizer",
        OFFLOAD_PARAMS: par.offload == "params",
        REPLICATE: par.replicate > 1,
        KEEP_GATHERED: not par.reshard_after_forward,
        ASYNC_SAVE: cfg.checkpoint.async_,
        QUANTIZATION: cfg.model.quantization != "none",
        COMPILE: cfg.train.compile,
        DEEPSPEED_CONFIG: bool(par.deepspeed_config),
        SEQUENCE_PARALLEL: par.sequence_parallel > 1,
    }
    return [Request(capability, capability) for capability, wanted in asked.items() if wanted] + [
        Request(capability, key, need) for capability, key, need in strategy_needs(cfg)]
