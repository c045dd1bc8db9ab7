"""Loss normalisation: invariant 2 on one rank (summed token losses over the global target count)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.model.loss import IGNORE_INDEX, count_targets, summed_loss


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

