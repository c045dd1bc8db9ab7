"""Cutting a collated micro-batch for the ranks of a sequence group (trainer/data/sequence_shard.py):
the shards put back together are the micro-batch, document bounds travel with every shard, labels
are shifted before the cut (a shard's last token predicts the next shard's first; no token predicts
across a document boundary), and targets and data counters add up once per group. The attention
that uses these shards is checked on 2 ranks in tests/parallel/test_strategies.py."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import PAD, make_dataset
from trainer.data.collate import Collator
from trainer.data.packing import Piece
from trainer.data.sequence_shard import document_starts, sequence_shard
from trainer.model.loss import IGNORE_INDEX

X = IGNORE_INDEX
DOCS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]
TARGETS = [[False, True, True, True, True], [True, True, True], [False, False, True, True, True, True, True]]
# Row 0: documents of 5 and 3 tokens; row 1: one of 7 (rows of 12). Flattened pad-free, the 15
# tokens are one stream of 16 (a multiple of 8) whose last position is a padding document.
ROWS = [[Piece(0, 0, 0, 5, True), Piece(0, 1, 0, 3, True)], [Piece(0, 2, 0, 7, True)]]


def collate(attention: str, packing: bool = True, rows=ROWS):
    dataset = make_dataset(DOCS, TARGETS, seq_len=12)
    return Collator([dataset], "causal_lm", 12, packing, attention, PAD)(rows)


def joined(shards, key):
    return torch.cat([s.inputs[key].reshape(-1) if key != "labels" else s.labels.reshape(-1) for s in shards])


@pytest.mark.parametrize("size", [2, 4])
def test_shards_put_back_together_are_the_micro_batch_with_labels_shifted_before_the_cut(size):
    batch = collate("varlen_reference")
    shards = [sequence_shard(batch, rank, size, PAD) for rank in range(size)]
    assert all(s.inputs["input_ids"].shape == (1, 16 // size) for s in shards)
    assert torch.equal(joined(shards, "input_ids"), batch.inputs["input_ids"].reshape(-1))
    assert torch.equal(joined(shards, "position_ids"), batch.inputs["position_ids"].reshape(-1))
    for s in shards:  # every rank knows every document's bounds
        assert s.inputs["cu_seq_lens_q"].tolist() == [0, 5, 8, 15, 16] == s.inputs["cu_seq_lens_k"].tolist()
        assert s.inputs["max_length_q"] == s.inputs["max_length_k"] == 7 and "attention_mask" not in s.inputs
        assert s.labels_shifted and s.inputs["use_cache"] is False
    # labels[t] is the token position t predicts: the next one within its document, never across
    assert joined(shards, "labels").tolist() == [12, 13, 14, 15, X, 22, 23, X, X, 33, 34, 35, 36, 37, X, X]
    assert sum(s.num_targets for s in shards) == batch.num_targets == 11
    if size == 4:  # positions 0-3 | 4-7 | 8-11 | 12-15: documents 1 and 3 cross a cut
        assert shards[0].inputs["input_ids"][0].tolist() == [11, 12, 13, 14]
        assert shards[1].inputs["input_ids"][0, 0] == 15 and shards[0].labels[0, 3] == 15  # predicts across the cut
        assert shards[2].labels[0, -1] == 35  # the last token of rank 2 predicts rank 3's first
        assert shards[3].inputs["input_ids"][0, 0] == 35


def test_the_first_token_of_a_document_is_never_a_target_even_where_the_collator_made_it_one():
    batch = collate("varlen_reference")
    batch.labels = torch.where(batch.inputs["input_ids"] != PAD, batch.inputs["input_ids"], X)  # boundaries unmasked
    shards = [sequence_shard(batch, rank, 2, PAD) for rank in range(2)]
    labels = joined(shards, "labels").tolist()
    starts = [0, 5, 8, 15]
    assert all(labels[s - 1] == X for s in starts[1:])  # nothing predicts a document's first token
    assert labels[:4] == [12, 13, 14, 15]


@pytest.mark.parametrize("attention, packing", [("sdpa", True), ("eager", True), ("sdpa", False)])
def test_every_layout_gives_the_same_document_bounds(attention, packing):
    """sdpa's block mask and padded rows carry no cu_seq_lens: the bounds come from restarting
    position ids and from the padding mask: each row's documents, then its padding."""
    rows = ROWS if packing else [[piece] for row in ROWS for piece in row]
    batch = collate(attention, packing, rows)
    width = batch.inputs["input_ids"].shape[1]
    expected = [0, 5, 8, width, width + 7] if packing else [0, 5, width, width + 3, 2 * width]
    assert document_starts(batch.inputs) == expected
    shards = [sequence_shard(batch, rank, 2, PAD) for rank in range(2)]
    ids = batch.inputs["input_ids"].reshape(-1)  # 3 padded rows of 7: 21 tokens, and one of padding
    assert torch.equal(joined(shards, "input_ids")[:ids.numel()], ids)
    assert sum(s.num_targets for s in shards) == batch.num_targets


def test_a_stream_that_does_not_split_evenly_gets_a_padding_document():
    batch = collate("varlen_reference")
    for key in ("input_ids", "position_ids"):
        batch.inputs[key] = batch.inputs[key][:, :15]
    batch.labels = batch.labels[:, :15]
    batch.inputs["cu_seq_lens_q"] = batch.inputs["cu_seq_lens_k"] = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    shards = [sequence_shard(batch, rank, 2, PAD) for rank in range(2)]
    assert [s.inputs["input_ids"].shape[1] for s in shards] == [8, 8]
    assert shards[1].inputs["cu_seq_lens_q"].tolist() == [0, 5, 8, 15, 16]
    assert shards[1].inputs["input_ids"][0, -1] == PAD and shards[1].labels[0, -1] == X
    assert sum(s.num_targets for s in shards) == batch.num_targets


def test_data_counters_are_kept_once_per_group():
    batch = collate("varlen_reference")
    first, second = (sequence_shard(batch, rank, 2, PAD) for rank in range(2))
    assert (first.num_tokens, first.num_slots, first.examples, first.tokens) == (15, 16, {"docs": 3}, {"docs": 15})
    assert (second.num_tokens, second.num_slots, second.examples, second.tokens) == (0, 0, {"docs": 0}, {"docs": 0})


@pytest.mark.parametrize("size", [2, 3, 4, 6])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "sdpa_varlen", "varlen_reference"])
def test_under_sequence_parallelism_every_backend_gets_a_pad_free_stream_that_splits_evenly(attention, size):
    """The loader's collator under `parallel.sequence_parallel` N flattens the rows on every backend
    (no seq_len^2 mask built to be dropped), pad-free up to a multiple of 8 and of N, so that the
    shards are equal without a filler document and carry the collator's own bounds."""
    from trainer.config.schema import Config
    from trainer.data.collate import build_collator

    cfg = Config()
    cfg.data.seq_len, cfg.parallel.sequence_parallel = 12, size
    batch = build_collator(cfg, [make_dataset(DOCS, TARGETS, seq_len=12)], type("T", (), {"pad_token_id": PAD}),
                      attention)(ROWS)
    length = -(-15 // math.lcm(8, size)) * math.lcm(8, size)
    assert "attention_mask" not in batch.inputs and batch.inputs["input_ids"].shape == (1, length)
    assert batch.inputs["cu_seq_lens_q"].tolist() == [0, 5, 8, 15, length]
    shards = [sequence_shard(batch, rank, size, PAD) for rank in range(size)]
    assert all(s.inputs["input_ids"].shape == (1, length // size) for s in shards)
    assert all(s.inputs["cu_seq_lens_q"].tolist() == [0, 5, 8, 15, length] for s in shards)
    assert torch.equal(joined(shards, "input_ids"), batch.inputs["input_ids"].reshape(-1))
    assert sum(s.num_targets for s in shards) == batch.num_targets == 11
