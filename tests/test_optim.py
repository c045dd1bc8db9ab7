"""AdamW parameter groups (decay / no decay, frozen parameters left out) and learning-rate schedules."""

from __future__ import annotations

import pytest
from torch import nn

from trainer.config.schema import OptimConfig
from trainer.optim import build_optimizer, lr_multiplier, parameter_groups


def test_no_decay_for_bias_norm_and_embeddings():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    groups = parameter_groups(model, weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[1].weight)}


def test_frozen_parameters_are_left_out():
    model = nn.Linear(4, 4)
    model.weight.requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig())
    assert [p for g in optimizer.param_groups for p in g["params"]] == [model.bias]
    model.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay_to_min(scheduler):
    cfg = OptimConfig(scheduler=scheduler, warmup_steps=4, min_lr_ratio=0.1)
    values = [lr_multiplier(step, cfg, total_steps=20) for step in range(20)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0)
    if scheduler == "constant":
        assert values[4:] == pytest.approx([1.0] * 16)
    else:
        assert all(a >= b for a, b in zip(values[4:], values[5:]))
        assert lr_multiplier(20, cfg, 20) == pytest.approx(0.1)
    if scheduler == "cosine":
        assert values[12] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through decay
