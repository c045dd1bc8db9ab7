"""DeepSpeed's config, generated from finetrain's keys and merged with a user's JSON (zero1-3).
(Which keys each strategy refuses: test_plan.py.)"""

from __future__ import annotations

import json

import pytest

from helpers import TINY_LLAMA
from trainer.config.schema import Config
from trainer.parallel.zero import deepspeed_config


def make_cfg(**parallel) -> Config:
    cfg = Config()
    cfg.model.config = dict(TINY_LLAMA)
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def test_generated_deepspeed_config_follows_finetrain_keys():
    cfg = make_cfg(strategy="zero3", offload="params", mixed_precision="bf16")
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 2, 16
    cfg.optim.max_grad_norm = 0.5
    ds = deepspeed_config(cfg, stage=3, world_size=4, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 16
    assert ds["managed_gradient_accumulation"] is False  # the loop owns the accumulation boundary
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage3_param_persistence_threshold"] == 640

    plain = deepspeed_config(make_cfg(strategy="zero1", mixed_precision="fp32"), stage=1, world_size=2,
                             hidden_size=64)
    assert plain["bf16"] == {"enabled": False}
    assert "offload_optimizer" not in plain["zero_optimization"] and plain["zero_optimization"]["stage"] == 1


def test_user_deepspeed_json_overrides_key_by_key(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 123},
                                "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": True}))
    cfg = make_cfg(strategy="zero2", deepspeed_config=str(user))
    ds = deepspeed_config(cfg, stage=2, world_size=2, hidden_size=64)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 123, "overlap_comm": True}
    assert ds["wall_clock_breakdown"] is True
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size  # "auto" keeps finetrain's


@pytest.mark.parametrize("content, message", [
    ({"optimizer": {"type": "AdamW"}}, "sets 'optimizer'; finetrain builds the optimizer"),
    ({"train_micro_batch_size_per_gpu": 7}, "sets train_micro_batch_size_per_gpu=7 but finetrain's batch keys give 1"),
    ({"zero_optimization": {"stage": 3}}, "sets zero_optimization.stage 3, but the strategy is ZeRO stage 2"),
    ('{"bf16": {"enabled": true},\n "oops"}', "ds.json:2: not valid JSON"),
])
def test_user_deepspeed_json_that_contradicts_finetrain_is_refused(tmp_path, content, message):
    user = tmp_path / "ds.json"
    user.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError) as err:
        deepspeed_config(make_cfg(strategy="zero2", deepspeed_config=str(user)), stage=2, world_size=2,
                         hidden_size=64)
    assert message in str(err.value) and "parallel.deepspeed_config" in str(err.value)
