"""Invariant 1 for preference pairs: packed pad-free, with rehearsal documents beside them, every
sequence isolated, the summed log-probability of each sequence, the losses and the gradients equal
those of the same pairs unpacked (each sequence in a padded row of its own), on every attention
backend, through the target-only head and the full logits; the checks fail when a leak is planted
(no per-document mask), and padding is never a sequence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import PAD, TINY_LLAMA, make_dataset, make_pair_dataset, random_pairs
from trainer.build import build_model
from trainer.config.schema import Config, ModelConfig, PreferenceConfig, TrainConfig
from trainer.data.collate import Collator
from trainer.data.packing import pack_pieces
from trainer.model.loss import IGNORE_INDEX, forward_summed_loss
from trainer.model.loss_head import fused_head
from trainer.preference.losses import unit_losses
from trainer.preference.scoring import score_sequences

SEQ_LEN = 96
CPU = torch.device("cpu")


def datasets():
    """14 pairs and, for rehearsal, 6 text documents (every token a target)."""
    pairs = make_pair_dataset(random_pairs(14, seed=1), seq_len=SEQ_LEN)
    rng = np.random.default_rng(2)
    docs = [rng.integers(1, 300, int(rng.integers(4, 30))).tolist() for _ in range(6)]
    text = make_dataset(docs, [[True] * len(d) for d in docs], name="text", text=True, seq_len=SEQ_LEN)
    return [pairs, text]


def pieces(sets) -> list:
    return [p for index, ds in enumerate(sets) for e in ds.examples for p in ds.pieces(index, int(e))]


def tiny_model(tokenizer, attention: str, fused: bool = True):
    cfg = Config(model=ModelConfig(config=dict(TINY_LLAMA), tokenizer="train-bpe"), train=TrainConfig(fused_loss=fused))
    return build_model(cfg, tokenizer, attention)


def reference_of(key) -> float:
    """A fixed reference log-probability per sequence, so that every pair's loss has a gradient."""
    return -20.0 - (hash(key) % 1000) / 100


def run(model, collate: Collator, rows: list, per_batch: int, use_cache: bool = False):
    """Each sequence's summed log-probability, the summed DPO loss and rehearsal NLL, and the gradients."""
    model.zero_grad(set_to_none=True)
    logps, total = {}, 0.0
    for i in range(0, len(rows), per_batch):
        batch = collate(rows[i: i + per_batch])
        if use_cache:
            batch.inputs["use_cache"] = True
        if batch.preference is None:  # rehearsal rows only: the cross-entropy path
            loss = forward_summed_loss(model, batch.inputs, batch.labels, "causal_lm")
            loss.backward()
            total += float(loss.detach())
            continue
        scored, others = score_sequences(model, batch, CPU, "causal_lm")
        scored.reference = torch.tensor([reference_of(k) for k in batch.preference.keys])
        loss = unit_losses(PreferenceConfig(), "causal_lm", scored).losses.sum() - others.sum()
        loss.backward()
        total += float(loss.detach())
        logps.update({key: float(value) for key, value in zip(batch.preference.keys, scored.policy.detach())})
    return logps, total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, want, tol: float = 1e-5) -> None:
    assert got[0].keys() == want[0].keys() and len(want[0]) == 28  # every sequence of every pair, once
    for key in want[0]:
        assert got[0][key] == pytest.approx(want[0][key], rel=tol, abs=tol), key
    assert got[1] == pytest.approx(want[1], rel=tol)
    assert got[2].keys() == want[2].keys() and want[2]
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen_reference", "sdpa_varlen"])
def test_packed_pairs_equal_unpacked_pairs(tiny_tokenizer, attention, fused):
    torch.manual_seed(0)
    sets = datasets()
    model = tiny_model(tiny_tokenizer, attention, fused)
    assert (fused_head(model) is not None) == fused
    packed_rows = pack_pieces(pieces(sets), SEQ_LEN)
    assert any(sum(p.dataset == 0 for p in row) > 1 and any(p.dataset == 1 for p in row) for row in packed_rows)
    packed = run(model, Collator(sets, "causal_lm", SEQ_LEN, True, attention, PAD), packed_rows, 2)
    unpacked = run(model, Collator(sets, "causal_lm", SEQ_LEN, False, attention, PAD), [[p] for p in pieces(sets)], 3)
    assert_same(packed, unpacked)


def test_the_check_fails_when_packed_pairs_lack_per_document_masks(tiny_tokenizer):
    """Without a block mask, packed documents are isolated only by restarting position_ids, and only
    while no KV cache is built (open-instruct #1448: packing without per-document masks)."""
    torch.manual_seed(0)
    sets = datasets()
    model = tiny_model(tiny_tokenizer, "sdpa")
    unpacked = run(model, Collator(sets, "causal_lm", SEQ_LEN, False, "sdpa", PAD), [[p] for p in pieces(sets)], 3)

    class PositionsOnly(Collator):
        def __call__(self, rows):
            batch = super().__call__(rows)
            del batch.inputs["attention_mask"]
            return batch

    rows = pack_pieces(pieces(sets), SEQ_LEN)
    assert_same(run(model, PositionsOnly(sets, "causal_lm", SEQ_LEN, True, "sdpa", PAD), rows, 2), unpacked)
    with pytest.raises(AssertionError):
        assert_same(run(model, PositionsOnly(sets, "causal_lm", SEQ_LEN, True, "sdpa", PAD), rows, 2,
                        use_cache=True), unpacked)


@pytest.mark.parametrize("packing", [True, False])
def test_padding_is_never_a_sequence(tiny_tokenizer, packing):
    """Rows of uneven length padded (a padding tail in a packed row, padded rows unpacked): only the
    pairs' sequences are scored, so where the policy is its own reference DPO is ln 2 exactly; a
    padding row counted as one more rejected sequence (open-instruct #1900) moves it."""
    sets = datasets()[:1]
    model = tiny_model(tiny_tokenizer, "sdpa")
    rows = pack_pieces(pieces(sets)[:5], SEQ_LEN) if packing else [[p] for p in pieces(sets)[:5]]
    batch = Collator(sets, "causal_lm", SEQ_LEN, packing, "sdpa", PAD)(rows)
    assert batch.num_slots > batch.num_tokens  # there is padding
    preference = batch.preference
    assert preference.num_pairs == 5 and preference.num_sequences == 10
    is_padding = batch.inputs["input_ids"] == PAD
    assert (preference.token_sequence[is_padding] == -1).all()
    assert set(preference.token_sequence[batch.labels != IGNORE_INDEX].tolist()) == set(range(10))
    with torch.no_grad():
        scored = score_sequences(model, batch, CPU, "causal_lm")[0]
    scored.reference = scored.policy.clone()
    dpo = unit_losses(PreferenceConfig(), "causal_lm", scored).losses
    assert float(dpo.mean()) == pytest.approx(math.log(2), abs=1e-7)
    # planted: a padding row scored as the rejected sequence of one more pair (log-probability 0)
    scored.policy, scored.reference = torch.cat([scored.policy, torch.zeros(2)]), torch.cat([scored.reference,
                                                                                            torch.tensor([0., 5.])])
    scored.pair, scored.chosen = torch.cat([scored.pair, torch.tensor([5, 5])]), torch.cat([scored.chosen,
                                                                                           torch.tensor([True, False])])
    scored.tokens, scored.margin = torch.cat([scored.tokens, torch.ones(2)]), torch.cat([scored.margin, torch.zeros(2)])
    assert float(unit_losses(PreferenceConfig(), "causal_lm", scored).losses.mean()) != pytest.approx(math.log(2))
