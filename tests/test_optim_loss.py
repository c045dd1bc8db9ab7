"""Loss normalisation (invariant 2 on one rank), parameter groups and schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.loss import IGNORE_INDEX, count_targets, summed_loss
from trainer.optim import build_optimizer, lr_multiplier, parameter_groups


def test_summed_loss_matches_token_mean_over_all_micro_batches():
    torch.manual_seed(0)
    vocab = 11
    # uneven: micro-batch 1 has many targets, micro-batch 2 very few
    logits = [torch.randn(2, 6, vocab), torch.randn(2, 6, vocab)]
    labels = [torch.randint(0, vocab, (2, 6)), torch.full((2, 6), IGNORE_INDEX)]
    labels[1][0, 2] = 3
    total = sum(count_targets(l, "causal_lm") for l in labels)
    assert total == 2 * 5 + 1
    normalised = sum(summed_loss(lg, lb, "causal_lm") for lg, lb in zip(logits, labels)) / total
    flat_logits = torch.cat([lg[:, :-1].reshape(-1, vocab) for lg in logits])
    flat_labels = torch.cat([lb[:, 1:].reshape(-1) for lb in labels])
    reference = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(normalised, reference)
    # the per-micro-batch mean (the common default) differs: this is what the sum avoids
    naive = sum(nn.functional.cross_entropy(lg[:, :-1].reshape(-1, vocab), lb[:, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX) for lg, lb in zip(logits, labels)) / 2
    assert not torch.allclose(naive, reference)


def test_first_token_of_a_document_is_never_a_target():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 8]])  # two documents, second starts at 3
    logits = torch.zeros(1, 5, 10, requires_grad=True)
    summed_loss(logits, labels, "causal_lm").backward()
    # position 2 (last of doc 1) must get no gradient: it would predict doc 2's first token
    assert logits.grad[0, 2].abs().sum() == 0
    assert logits.grad[0, 0].abs().sum() > 0 and logits.grad[0, 3].abs().sum() > 0


def test_classification_counts_rows():
    labels = torch.tensor([0, 1, 1])
    assert count_targets(labels, "sequence_classification") == 3
    logits = torch.zeros(3, 2)
    assert summed_loss(logits, labels, "sequence_classification").item() == pytest.approx(3 * math.log(2))


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
