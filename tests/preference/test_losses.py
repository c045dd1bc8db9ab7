"""The preference losses (trainer/preference/losses.py): each formula's value where the policy is
its own reference (the first step: DPO ln 2, IPO 1/(4 beta^2), KTO 0.5, hinge 1), the reference-free
ones against their papers' formulas, and the direction of the gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config.schema import PreferenceConfig
from trainer.preference.losses import Scored, unit_losses

PAIRS = 5


def scored(policy: torch.Tensor, reference: torch.Tensor | None = None, paired: bool = True,
           margin: float = 0.0) -> Scored:
    """Sequences chosen, rejected, chosen, ... (pairs), or alternately desirable and not (unpaired)."""
    count = len(policy)
    pair = torch.arange(count) // 2 if paired else torch.full((count,), -1)
    return Scored(policy, reference, torch.arange(count) % 7 + 3, pair, torch.arange(count) % 2 == 0,
                  torch.full((count,), margin))


def policy_logps(seed: int = 0) -> torch.Tensor:
    return -torch.rand(2 * PAIRS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 40 - 1


@pytest.mark.parametrize("loss,beta,smoothing,first", [
    ("dpo", 0.1, 0.0, math.log(2)), ("dpo", 0.5, 0.2, math.log(2)), ("robust", 0.1, 0.3, math.log(2)),
    ("hinge", 0.1, 0.0, 1.0), ("ipo", 0.1, 0.0, 1 / (4 * 0.1 ** 2)), ("ipo", 0.5, 0.0, 1.0),
    ("kto", 0.1, 0.0, 0.5), ("kto", 2.0, 0.0, 0.5)])
def test_first_step_value_where_the_policy_is_its_own_reference(loss, beta, smoothing, first):
    policy = policy_logps()
    cfg = PreferenceConfig(loss=loss, beta=beta, label_smoothing=smoothing)
    units = unit_losses(cfg, "causal_lm", scored(policy.clone(), policy.clone(), paired=loss != "kto"))
    assert len(units.losses) == (2 * PAIRS if loss == "kto" else PAIRS)
    torch.testing.assert_close(units.losses, torch.full_like(units.losses, first))
    assert not units.chosen_rewards.any() and not units.rejected_rewards.any()


def test_reference_free_losses_follow_their_papers():
    policy, beta, gamma = policy_logps(1), 2.0, 0.7
    s = scored(policy)
    mean = policy / s.tokens
    c, r = mean[0::2], mean[1::2]
    simpo = unit_losses(PreferenceConfig(loss="simpo", beta=beta, gamma=gamma), "causal_lm", s)
    torch.testing.assert_close(simpo.losses, -F.logsigmoid(beta * c - beta * r - gamma))
    orpo = unit_losses(PreferenceConfig(loss="orpo", beta=beta), "causal_lm", s)
    odds = lambda p: p - torch.log(1 - torch.exp(p))  # noqa: E731  (log odds of a mean log-probability)
    torch.testing.assert_close(orpo.losses, -beta * F.logsigmoid(odds(c) - odds(r)))
    torch.testing.assert_close(orpo.chosen_rewards, beta * c)


def test_a_reward_model_pair_pays_for_a_score_gap_below_its_margin():
    scores = torch.tensor([2.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    units = unit_losses(PreferenceConfig(), "reward_model", scored(scores, margin=0.5))
    torch.testing.assert_close(units.losses, -F.logsigmoid(torch.tensor([0.5, -3.5], dtype=torch.float64)))
    assert units.chosen_rewards.tolist() == [2.0, 0.0] and units.rejected_rewards.tolist() == [1.0, 3.0]


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_the_gradient_raises_the_chosen_answer_and_lowers_the_rejected_one(loss):
    policy = policy_logps(2).requires_grad_(True)
    reference = policy.detach() + 0.01 * torch.randn(2 * PAIRS, generator=torch.Generator().manual_seed(3),
                                                      dtype=torch.float64)
    unit_losses(PreferenceConfig(loss=loss, label_smoothing=0.1 if loss == "robust" else 0.0), "causal_lm",
                scored(policy, reference)).losses.sum().backward()
    assert (policy.grad[0::2] < 0).all() and (policy.grad[1::2] > 0).all()


def test_kto_weighs_each_completion_around_the_reference_point():
    policy = policy_logps(4)
    reference = policy - torch.linspace(-1, 1, 2 * PAIRS, dtype=torch.float64)
    s = scored(policy, reference, paired=False)
    units = unit_losses(PreferenceConfig(loss="kto", beta=0.5), "causal_lm", s, reference_point=0.2)
    reward = policy - reference
    want = torch.where(s.chosen, 1 - torch.sigmoid(0.5 * (reward - 0.2)), 1 - torch.sigmoid(0.5 * (0.2 - reward)))
    torch.testing.assert_close(units.losses, want)
    assert not units.paired and len(units.chosen_rewards) == PAIRS
