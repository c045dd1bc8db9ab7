"""The preference losses, from each sequence's summed log-probability (docs/preference.md has
the formulas with their sources).

Per pair, with p the policy's and q the reference's summed log-probabilities of the chosen (c)
and rejected (r) answer, n their target tokens, and h = (p_c - q_c) - (p_r - q_r):

    dpo      -(1 - e) log s(b h) - e log s(-b h)                 (e: label_smoothing, cDPO)
    robust   (-(1 - e) log s(b h) + e log s(-b h)) / (1 - 2e)
    hinge    max(0, 1 - b h)
    ipo      (h' - 1 / (2 b))^2, h' as h with per-token means (p / n, q / n)
    simpo    -log s(b (p_c / n_c - p_r / n_r) - g)               (no reference)
    orpo     -b log s(log odds(p_c / n_c) - log odds(p_r / n_r)) (no reference; plus the chosen NLL)

per judged completion (KTO), with r = p - q and z the step's reference point:

    kto      1 - s(b (r - z)) when desirable, 1 - s(b (z - r)) when not

and per pair of a reward model's scores s_c, s_r with the pair's margin m (Bradley-Terry):

    reward   -log s(s_c - s_r - m)

Each returns the per-unit losses and the rewards logged as rewards/chosen and rewards/rejected:
b (p - q) for the losses with a reference (per-token means for ipo), b p / n for simpo and orpo,
the scores of a reward model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config.schema import PreferenceConfig

# The losses that compare the policy with a reference model; simpo and orpo need none.
REFERENCE_LOSSES = ("dpo", "ipo", "hinge", "robust", "kto")


@dataclass
class Scored:
    """A micro-batch's (or an eval set's) sequences as the losses take them, in layout order."""

    policy: torch.Tensor  # [S] summed log-probabilities (a reward model: scores)
    reference: torch.Tensor | None  # [S] the reference's, None for losses without one
    tokens: torch.Tensor  # [S] target tokens of each sequence
    pair: torch.Tensor  # [S] pair index, -1 for an unpaired completion
    chosen: torch.Tensor  # [S] chosen, or desirable
    margin: torch.Tensor  # [S] the pair's margin


@dataclass
class UnitLosses:
    """One loss per unit (a pair, or a KTO completion) and the rewards of its answers."""

    losses: torch.Tensor  # [U]
    chosen_rewards: torch.Tensor  # [pairs] or [desirable completions]
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    paired: bool  # the rewards of one index belong to one pair (accuracies and margins are per pair)


def unit_losses(cfg: PreferenceConfig, task: str, scored: Scored, reference_point: float = 0.0) -> UnitLosses:
    """The losses of `scored`'s units under `cfg` (kto: around `reference_point`)."""
    tokens = scored.tokens.to(scored.policy.dtype).clamp(min=1)
    if task == "reward_model":
        c, r = _sides(scored)
        scores_c, scores_r = scored.policy[c], scored.policy[r]
        losses = -F.logsigmoid(scores_c - scores_r - scored.margin[c].to(scores_c.dtype))
        return UnitLosses(losses, scores_c.detach(), scores_r.detach(), scores_c.detach(), scores_r.detach(), True)
    beta = cfg.beta
    if cfg.loss == "kto":
        reward = scored.policy - scored.reference
        chosen = scored.chosen
        losses = torch.where(chosen, 1 - torch.sigmoid(beta * (reward - reference_point)),
                             1 - torch.sigmoid(beta * (reference_point - reward)))
        rewards = beta * reward.detach()
        logps = scored.policy.detach()
        return UnitLosses(losses, rewards[chosen], rewards[~chosen], logps[chosen], logps[~chosen], False)
    c, r = _sides(scored)
    p_c, p_r = scored.policy[c], scored.policy[r]
    if cfg.loss in ("simpo", "orpo"):
        mean_c, mean_r = p_c / tokens[c], p_r / tokens[r]
        if cfg.loss == "simpo":
            losses = -F.logsigmoid(beta * (mean_c - mean_r) - cfg.gamma)
        else:
            log_odds = (mean_c - mean_r) - (_log1m_exp(mean_c) - _log1m_exp(mean_r))
            losses = -beta * F.logsigmoid(log_odds)
        return UnitLosses(losses, beta * mean_c.detach(), beta * mean_r.detach(), p_c.detach(), p_r.detach(), True)
    ratio_c, ratio_r = p_c - scored.reference[c], p_r - scored.reference[r]
    if cfg.loss == "ipo":
        ratio_c, ratio_r = ratio_c / tokens[c], ratio_r / tokens[r]
    h = ratio_c - ratio_r
    smoothing = cfg.label_smoothing
    if cfg.loss == "dpo":
        losses = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
    elif cfg.loss == "robust":
        losses = (-(1 - smoothing) * F.logsigmoid(beta * h) + smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * smoothing)
    elif cfg.loss == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    return UnitLosses(losses, beta * ratio_c.detach(), beta * ratio_r.detach(), p_c.detach(), p_r.detach(), True)


def _sides(scored: Scored) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the chosen and of the rejected sequences, each in pair order."""
    paired = scored.pair >= 0
    return torch.nonzero(paired & scored.chosen).squeeze(1), torch.nonzero(paired & ~scored.chosen).squeeze(1)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 (ORPO's odds of a mean log-probability)."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))
