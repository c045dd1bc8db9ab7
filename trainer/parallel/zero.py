"""DeepSpeed ZeRO stages 1-3: one engine whose config is generated from finetrain's keys.

Stage 1 shards the optimizer state, stage 2 also the gradients, stage 3 also the
parameters. `parallel.offload: optimizer` moves the optimizer state and step to the
CPU (DeepSpeed's CPU Adam, with finetrain's decay groups); `params` additionally
keeps the stage-3 parameter shards in host memory.

The loop owns the accumulation boundary: the engine runs with
`managed_gradient_accumulation: false`, so `backward` only accumulates (stage 2/3
reduce into their partitions as they go) and `step` is the boundary that
finishes the reduction and updates. Checkpoints are DeepSpeed's own; a checkpoint
saved at another world size is converted once to DeepSpeed's universal format.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainer.config.capabilities import (ASYNC_SAVE, COMPILE, DEEPSPEED_CONFIG, KEEP_GATHERED, MULTI_PROCESS,
                                         OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, QUANTIZATION, SEQUENCE_PARALLEL,
                                         WHOLE_BASE_WEIGHTS, WHOLE_GRADIENTS)
from trainer.config.schema import Config, cache_root
from trainer.model.loading import model_config
from trainer.optim import ADAM_MOMENTS, build_optimizer, build_scheduler, trainable_groups
from trainer.parallel.layer_options import apply_layer_options
from trainer.parallel.safe_load import load_plain
from trainer.parallel.strategy import Strategy
from trainer.runtime.distributed import DistInfo, barrier
from trainer.runtime.errors import ConfigError, UserError
from trainer.runtime.precision import compute_precision

log = logging.getLogger("finetrain")

CHECKPOINT_TAG = "deepspeed"  # <checkpoint>/deepspeed/: the engine's files as saved
UNIVERSAL_TAG = "universal"  # <checkpoint>/universal/: converted on the first resume at another world size

# Keys the loop decides; a user DeepSpeed JSON may repeat them only with the same value.
_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
               "managed_gradient_accumulation")
# Sections finetrain builds itself (optim.*); DeepSpeed would build a second optimizer from them.
_REFUSED_SECTIONS = ("optimizer", "scheduler")


def extensions_dir(cfg: Config) -> Path:
    """Where DeepSpeed compiles its ops (CPU Adam, shared-memory comms): the cache dir, never ~."""
    return cache_root(cfg) / "torch_extensions"


def bucket_elements(hidden_size: int) -> int:
    """Gradient reduction bucket: hidden^2 elements (as transformers' "auto" sizes it).
    DeepSpeed's default, 5e8 elements, allocates gigabytes even for a small model."""
    return hidden_size * hidden_size


def persistence_threshold(hidden_size: int) -> int:
    """ZeRO-3 keeps parameters smaller than this (norms, biases) whole on every rank."""
    return 10 * hidden_size


def generated_config(cfg: Config, stage: int, world_size: int, hidden_size: int | None) -> dict:
    """The DeepSpeed config that finetrain's keys (and the model's width) imply. DeepSpeed counts
    every rank as data-parallel (ZeRO partitions over all of them); with sequence parallelism
    the ranks of a sequence group share their rows, so the accumulation is over fewer."""
    micro = cfg.train.micro_batch_size
    accumulation = max(1, cfg.train.global_batch_size // (micro * (world_size // cfg.parallel.sequence_parallel)))
    pin = torch.cuda.is_available()
    zero: dict = {"stage": stage}
    if hidden_size:
        zero["reduce_bucket_size"] = bucket_elements(hidden_size)
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * bucket_elements(hidden_size))
            zero["stage3_param_persistence_threshold"] = persistence_threshold(hidden_size)
    if cfg.parallel.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.parallel.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "bf16": {"enabled": compute_precision(cfg.parallel.mixed_precision, cfg.model.dtype)[0] == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # finetrain logs its own metrics
        "wall_clock_breakdown": False,
    }


def deepspeed_config(cfg: Config, stage: int, world_size: int, hidden_size: int | None) -> dict:
    """The generated config with `parallel.deepspeed_config` merged over it (key by key)."""
    config = generated_config(cfg, stage, world_size, hidden_size)
    if not cfg.parallel.deepspeed_config:
        return config
    path = Path(cfg.parallel.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"parallel.deepspeed_config: {path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config: {path} must hold a JSON object")
    for section in _REFUSED_SECTIONS:
        if section in user:
            raise ConfigError(f"parallel.deepspeed_config: {path} sets {section!r}; finetrain builds the optimizer "
                             "and schedule from optim.* (remove the section)")
    for key in _OWNED_KEYS:
        if key in user and user[key] != "auto" and user[key] != config[key]:
            raise ConfigError(f"parallel.deepspeed_config: {path} sets {key}={user[key]!r} but finetrain's batch "
                             f"keys give {config[key]!r}; set train.micro_batch_size / train.global_batch_size instead")
    if "zero_optimization" in user and user["zero_optimization"].get("stage", config["zero_optimization"]["stage"]) \
            != config["zero_optimization"]["stage"]:
        raise ConfigError(f"parallel.deepspeed_config: {path} sets zero_optimization.stage "
                         f"{user['zero_optimization']['stage']}, but the strategy is ZeRO stage {stage}")
    return _merge(config, user)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ZeroStrategy(Strategy):
    """DeepSpeed's engine at one ZeRO stage (the subclasses below)."""

    stage = 0
    checkpoint_format = "deepspeed"
    supports = frozenset({MULTI_PROCESS, OFFLOAD_OPTIMIZER, DEEPSPEED_CONFIG, SEQUENCE_PARALLEL})
    why_not = {
        WHOLE_GRADIENTS: "reduces the gradients into its own partitions inside its step",
        ASYNC_SAVE: "writes DeepSpeed's own checkpoint files, which it does synchronously",
        QUANTIZATION: "saves the 4-bit base with bitsandbytes' quantization state in DeepSpeed's checkpoint, which "
                      "DeepSpeed's loader refuses, so the run could not resume",
        OFFLOAD_PARAMS: "does not partition parameters",
    }

    def __init__(self, cfg: Config, dist_info: DistInfo, plan):
        super().__init__(cfg, dist_info, plan)

        hidden_size = getattr(model_config(cfg), "hidden_size", None)
        self.ds_config = deepspeed_config(cfg, self.stage, dist_info.world_size, hidden_size)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir(cfg)))
        # DeepSpeed reads the rank layout from the environment, which a world of one
        # started without torchrun does not have.
        for key, value in (("RANK", dist_info.rank), ("LOCAL_RANK", dist_info.local_rank),
                           ("WORLD_SIZE", dist_info.world_size)):
            os.environ.setdefault(key, str(value))
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
        import deepspeed

        # DeepSpeed's communication layer wraps the process group that is already up; its
        # config objects (zero.Init's included) read the world size from it.
        deepspeed.init_distributed(dist_backend=dist_info.backend, dist_init_required=False)
        self.engine = None

    def build_model(self, make_model: Callable[[], nn.Module]) -> nn.Module:
        """ZeRO-3 loads a pretrained model already partitioned: while transformers sees the
        DeepSpeed config it builds under `deepspeed.zero.Init` and loads each rank's shard.
        A random init (model.config: a test or debug model) is built whole and partitioned
        by the engine instead, because transformers' ZeRO-3 init draws its random numbers
        in another order, and every strategy must start from the same weights."""
        if self.stage != 3 or self.cfg.model.path is None:
            return make_model()
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        hf_deepspeed_config = HfDeepSpeedConfig(self.ds_config)  # noqa: F841  (transformers keeps a weak reference)
        try:
            return make_model()
        finally:
            unset_hf_deepspeed_config()

    def setup(self, model: nn.Module, total_steps: int) -> None:
        import deepspeed

        apply_layer_options(model, self.cfg, self.dist.device)
        optimizer = self._client_optimizer(model)
        scheduler = build_scheduler(optimizer, self.cfg.optim, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False)
        if not hasattr(self.engine, "managed_gradient_accumulation"):
            raise RuntimeError(f"parallel.strategy {self.name}: DeepSpeed {deepspeed.__version__} cannot leave the "
                               "accumulation boundary to the caller; install deepspeed>=0.19.8")
        self.model = self.engine

    def frozen_copy(self, make_model: Callable[[], nn.Module]) -> nn.Module:
        """Stage 3: partitioned by an engine of its own without an optimizer (DeepSpeed gathers each
        layer's weights for its forward); stages 1 and 2 do not partition weights: a whole copy,
        in the dtype the engine computes the trained one in."""
        model = self.build_model(make_model)
        model.requires_grad_(False)
        if self.stage == 3:
            import deepspeed

            engine, *_ = deepspeed.initialize(model=model, config=self.ds_config, dist_init_required=False)
            engine.eval()
            return engine
        model.to(self.dist.device)
        return (model.to(torch.bfloat16) if self.ds_config["bf16"]["enabled"] else model).eval()

    def _client_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """finetrain's AdamW groups; with offload, the same groups on DeepSpeed's vectorised
        CPU Adam (torch's AdamW is several times slower there)."""
        if self.cfg.parallel.offload == "none":
            return build_optimizer(model, self.cfg.optim)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        groups = trainable_groups(model, self.cfg.optim.weight_decay)
        o = self.cfg.optim
        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks (undone by the world-size factor) and
        # would divide by the accumulation steps (scale_wrt_gas=False): the loss is
        # already divided by the global target count of the step.
        self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def step(self, skip: bool = False) -> float:
        """The engine finishes the gradient reduction here, so the global norm is only known inside
        its step: DeepSpeed drops the update itself when the norm is not finite (and then leaves its
        scheduler alone, as the torch strategies do). `skip` needs nothing more: a loss that is not
        finite comes with gradients that are not (the cross-entropy of finite logits is finite)."""
        self.engine.step()  # reduce, clip (gradient_clipping), update, schedule, zero grads
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    # ------------------------------------------------------------------ state
    def save(self, path: Path) -> None:
        try:
            self.engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG)
        except Exception:
            # A rank whose write failed leaves save_checkpoint early, while the others wait in
            # the barrier that ends it: meet them there, so every rank goes on to agree on
            # the failure (the checkpointer reports it) instead of waiting for ever.
            barrier()
            raise

    def load(self, path: Path) -> None:
        refuse_code(path)  # before DeepSpeed unpickles any of them
        saved_world = saved_world_size(path / CHECKPOINT_TAG)
        if saved_world == self.dist.world_size:
            loaded, _ = self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG)
        else:
            log.info("%s was saved on %d ranks, resuming on %d: loading its universal form",
                     path, saved_world, self.dist.world_size)
            if self.dist.is_main:
                convert_to_universal(path)
            barrier()
            settings = [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
                        for group in self.optimizer.param_groups]
            # The engine reads this flag when loading; it is not known when the engine is built.
            self.engine._config.load_universal_checkpoint = True
            try:
                loaded, _ = self.engine.load_checkpoint(str(path), tag=UNIVERSAL_TAG)
            finally:
                self.engine._config.load_universal_checkpoint = False
            self._repair_universal_optimizer_state(settings)
        if loaded is None:
            raise RuntimeError(f"{path}: DeepSpeed found no checkpoint to load")

    def _repair_universal_optimizer_state(self, settings: list[dict]) -> None:
        """DeepSpeed's ZeRO-3 universal loader gives every parameter group the settings of the
        first (weight decay included) and one shared step-count tensor, which AdamW then
        advances once per group; put back each group's own settings and its own counter."""
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights at master precision (the fp32 optimizer copy for trainable
        parameters, not the bf16 compute copy), gathered rank by rank: collective."""
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        master_dtype = getattr(torch, self.cfg.model.dtype)
        param_ids = {id(p) for p in module.parameters()}
        gathered: dict[int, torch.Tensor] = {}
        state = {}
        for key, value in module.state_dict(keep_vars=True).items():
            if id(value) not in param_ids:
                state[key] = value.detach().cpu().clone()
                continue
            if id(value) not in gathered:  # tied weights appear under two keys
                if value.requires_grad:
                    tensor = safe_get_full_fp32_param(value)
                else:
                    with zero.GatheredParameters([value], enabled=hasattr(value, "ds_id")):
                        tensor = value.data.clone()
                gathered[id(value)] = tensor.detach().to("cpu", master_dtype)
            state[key] = gathered[id(value)]
        return state if self.dist.is_main else {}

    def unwrapped_model(self) -> nn.Module:
        return self.engine.module

    def local_weights(self) -> list[torch.Tensor]:
        # ZeRO-3 leaves each parameter empty outside a forward; the rank's partition is ds_tensor.
        return [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters() if p.requires_grad]


    @classmethod
    def memory(cls, name: str, shape, size, acts: int, cfg: Config, world: int) -> dict:
        """Weights and gradients in the compute dtype (stage 3 partitions the weights, keeping
        small ones whole on every rank, and gathers two layers at a time; stages 2-3 partition
        the gradients) plus the reduction buckets, and the fp32 master copy and AdamW moments
        partitioned over the ranks. `offload` moves those (and zero3 weights) to the host."""
        c = size.compute
        offload = cfg.parallel.offload != "none"
        bucket = bucket_elements(shape.hidden_size)
        trainable_partition = sum(math.ceil(n / world) for n in shape.trainable_numels)
        fp32_partition = 4 * trainable_partition
        moments = ADAM_MOMENTS * fp32_partition
        # ZeRO-3 computing in fp32 steps its weight partitions in place: no second copy.
        master = 0 if cls.stage == 3 and c == 4 and not offload else fp32_partition
        if cls.stage == 3:
            partitioned = c * sum(math.ceil(n / world) for n in shape.numels)
            persistent = c * sum(n for n in shape.numels if n < persistence_threshold(shape.hidden_size))
            gathered = c * 2 * shape.layer.total  # the layer running and the one prefetched
            weights = partitioned + persistent + gathered
            grads = c * trainable_partition + c * bucket
        else:
            partitioned, gathered = 0, 0
            weights = shape.total * c
            reduced = shape.trainable * c if cls.stage == 1 else c * trainable_partition
            grads = reduced + (4 if cls.stage == 1 else c) * bucket
        row = {"params": weights, "gathered": gathered, "grads": grads, "optimizer": master + moments, "host": 0,
               "saved": weights + master + moments}
        if offload:
            # The master copy, the moments and the fp32 gradient partition live on the host.
            row.update(optimizer=0, host=2 * fp32_partition + moments)
            if cfg.parallel.offload == "params":
                row["params"] -= partitioned
                row["host"] += partitioned
        return row

    @classmethod
    def load_weights(cls, checkpoint: Path, model: nn.Module) -> None:
        """The fp32 weights consolidated from the rank shards; frozen peft base weights may be
        absent (the freshly built model has them from its base)."""
        state = consolidated_state_dict(checkpoint)
        missing, unexpected = model.load_state_dict(state, strict=False)
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        if unexpected or any(key in trainable for key in missing):
            raise UserError(f"{checkpoint}: weights do not match the model (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]})")


class Zero1(ZeroStrategy):
    names = ("zero1",)
    stage = 1
    supports = ZeroStrategy.supports | {COMPILE, KEEP_GATHERED, WHOLE_BASE_WEIGHTS}


class Zero2(ZeroStrategy):
    names = ("zero2",)
    stage = 2
    supports = ZeroStrategy.supports | {COMPILE, KEEP_GATHERED, WHOLE_BASE_WEIGHTS}


class Zero3(ZeroStrategy):
    names = ("zero3",)
    stage = 3
    supports = ZeroStrategy.supports | {OFFLOAD_PARAMS}
    why_not = {
        **ZeroStrategy.why_not,
        COMPILE: "gathers parameters in hooks on every submodule of a decoder layer, which the compiled layer "
                 "cannot hold (or set train.compile=false)",
        KEEP_GATHERED: "always re-partitions parameters after forward",
        WHOLE_BASE_WEIGHTS: "loads model.path already partitioned over the ranks",
    }


def saved_world_size(tag_dir: Path) -> int:
    """Data-parallel ranks a DeepSpeed checkpoint was saved on: one optimizer shard each."""
    shards = list(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if not shards:
        raise UserError(f"{tag_dir}: no DeepSpeed ZeRO optimizer shards (not a zero1-3 checkpoint)")
    return len(shards)


def convert_to_universal(path: Path) -> Path:
    """Write <path>/universal from <path>/deepspeed (once; written aside, then renamed)."""
    from deepspeed.checkpoint import ds_to_universal

    target = path / UNIVERSAL_TAG
    if target.is_dir():
        return target
    staging = path / f".{UNIVERSAL_TAG}-incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(path / CHECKPOINT_TAG), output_folder=str(staging), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    os.rename(staging, target)
    return target


def deepspeed_classes() -> list[type]:
    """What DeepSpeed's checkpoint files hold besides tensors and plain data: its loss scaler (in
    the optimizer state), the ZeRO stage, and where each fragment of a parameter lives."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def refuse_code(path: Path) -> None:
    """DeepSpeed reads its files (`deepspeed/`, `universal/`) with `torch.load(weights_only=False)`,
    which runs whatever a planted pickle names: first every one of them is read with torch's
    weights-only unpickler admitting DeepSpeed's own classes (deepspeed_classes), tensors memory-
    mapped (only the pickle describing them is read), and a file naming anything else is refused."""
    allowed = deepspeed_classes()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".pt", ".pth", ".bin")):
        load_plain(file, str(file), allowed, mmap=True)


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state of a zero1-3 checkpoint, in one process (for export)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    refuse_code(checkpoint)
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=CHECKPOINT_TAG)
