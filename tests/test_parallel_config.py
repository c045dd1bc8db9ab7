"""Choosing a strategy, refusing keys it cannot honour, and DeepSpeed's generated config."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_LLAMA
from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.parallel import build_strategy, resolve_strategy
from trainer.parallel.zero import deepspeed_config


def make_cfg(**parallel) -> Config:
    cfg = Config()
    cfg.model.config = dict(TINY_LLAMA)
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def world(n: int) -> DistInfo:
    return DistInfo(rank=0, local_rank=0, world_size=n, device=torch.device("cpu"), backend="gloo")


def test_auto_is_fsdp_on_many_devices_and_single_on_one():
    cfg = make_cfg(strategy="auto")
    assert resolve_strategy(cfg, 1) == "single"
    assert resolve_strategy(cfg, 8) == "fsdp"
    assert resolve_strategy(make_cfg(strategy="zero2"), 8) == "zero2"


@pytest.mark.parametrize("keys, world_size, message", [
    ({"strategy": "single"}, 2, "parallel.strategy single runs on one process, but the world has 2"),
    ({"strategy": "auto", "offload": "optimizer"}, 1, "parallel.offload optimizer: parallel.strategy single (picked by auto)"),
    ({"strategy": "ddp", "offload": "optimizer"}, 2, "parallel.offload optimizer: parallel.strategy ddp"),
    ({"strategy": "ddp", "offload": "params"}, 2, "parallel.offload params: parallel.strategy ddp does not shard parameters"),
    ({"strategy": "zero2", "offload": "params"}, 2, "parallel.offload params: parallel.strategy zero2 does not shard parameters"),
    ({"strategy": "zero3", "reshard_after_forward": False}, 2, "parallel.reshard_after_forward false: zero3"),
    ({"strategy": "fsdp", "deepspeed_config": "ds.json"}, 2, "parallel.deepspeed_config: only read by zero1-3"),
])
def test_keys_a_strategy_cannot_honour_are_refused_before_anything_is_built(keys, world_size, message):
    with pytest.raises(ValueError) as err:
        build_strategy(make_cfg(**keys), world(world_size))
    assert message in str(err.value)


def test_generated_deepspeed_config_follows_finetrain_keys():
    cfg = make_cfg(strategy="zero3", offload="params", mixed_precision="bf16")
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 2, 16
    cfg.optim.max_grad_norm = 0.5
    ds = deepspeed_config(cfg, world_size=4, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 16
    assert ds["managed_gradient_accumulation"] is False  # the loop owns the accumulation boundary
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage3_param_persistence_threshold"] == 640

    plain = deepspeed_config(make_cfg(strategy="zero1", mixed_precision="fp32"), world_size=2, hidden_size=64)
    assert plain["bf16"] == {"enabled": False}
    assert "offload_optimizer" not in plain["zero_optimization"] and plain["zero_optimization"]["stage"] == 1


def test_user_deepspeed_json_overrides_key_by_key(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 123},
                                "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": True}))
    cfg = make_cfg(strategy="zero2", deepspeed_config=str(user))
    ds = deepspeed_config(cfg, world_size=2, hidden_size=64)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 123, "overlap_comm": True}
    assert ds["wall_clock_breakdown"] is True
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size  # "auto" keeps finetrain's


@pytest.mark.parametrize("content, message", [
    ({"optimizer": {"type": "AdamW"}}, "sets 'optimizer'; finetrain builds the optimizer"),
    ({"train_micro_batch_size_per_gpu": 7}, "sets train_micro_batch_size_per_gpu=7 but finetrain's batch keys give 1"),
    ({"zero_optimization": {"stage": 3}}, "sets zero_optimization.stage 3, but parallel.strategy is zero2"),
    ('{"bf16": {"enabled": true},\n "oops"}', "ds.json:2: not valid JSON"),
])
def test_user_deepspeed_json_that_contradicts_finetrain_is_refused(tmp_path, content, message):
    user = tmp_path / "ds.json"
    user.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError) as err:
        deepspeed_config(make_cfg(strategy="zero2", deepspeed_config=str(user)), world_size=2, hidden_size=64)
    assert message in str(err.value) and "parallel.deepspeed_config" in str(err.value)
