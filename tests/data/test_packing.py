"""Invariant 1: packing changes nothing but speed.

Packed rows and the same documents padded one per row give equal per-document logits,
equal summed loss and equal gradients (float32, 1e-5) on every attention backend, and
the checks used here are shown to fail when a leak is planted.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (PAD, TINY_LLAMA, WORDS, causal_config, make_dataset, read_metrics, step_losses,
                     train_here, word_tokenizer, write_config, write_jsonl)
from trainer.build import build_model
from trainer.config.schema import Config, ModelConfig, PeftConfig, TrainConfig
from trainer.data.collate import Collator
from trainer.data.packing import Piece, RowPacker, pack_pieces
from trainer.data.stream import StreamDataset
from trainer.model.loss import IGNORE_INDEX, forward_summed_loss, summed_loss
from trainer.model.loss_head import fused_head

SEQ_LEN = 64


def random_documents(count: int, seed: int, vocab: int = 300) -> StreamDataset:
    """Documents of 3..40 tokens; the first third of each is prompt (not a target)."""
    rng = np.random.default_rng(seed)
    docs, targets = [], []
    for _ in range(count):
        n = int(rng.integers(3, 41))
        docs.append(rng.integers(1, vocab, n).tolist())
        targets.append([i >= n // 3 for i in range(n)])
    return make_dataset(docs, targets)


def pieces_of(ds: StreamDataset) -> list[Piece]:
    return [p for e in ds.examples for p in ds.pieces(0, int(e))]


def tiny_llama(tiny_tokenizer, config: dict, attention: str, peft: str = "none", fused_loss: bool = True):
    cfg = Config(model=ModelConfig(config=config, tokenizer="train-bpe"), peft=PeftConfig(method=peft, r=4),
                 train=TrainConfig(fused_loss=fused_loss))
    model = build_model(cfg, tiny_tokenizer, attention)
    if peft == "lora":  # peft starts lora_B at zero; random values make every adapter gradient non-trivial
        generator = torch.Generator().manual_seed(1)  # the same values in every model built
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1, generator=generator)
    return model


def placements(rows: list[list[Piece]], row_starts: list[int], flattened: bool) -> dict[tuple, tuple[int, int]]:
    """(example, start) -> (batch row, first position) of each piece in a collated batch."""
    where = {}
    for b, (row, start) in enumerate(zip(rows, row_starts)):
        at = start if flattened else 0
        for piece in row:
            where[(piece.example, piece.start)] = (0, at) if flattened else (b, at)
            at += piece.length
    return where


def run_batches(model, collator: Collator, rows: list[list[Piece]], rows_per_batch: int, **extra_inputs):
    """Summed loss and target count over micro-batches, and each piece's logits."""
    model.zero_grad(set_to_none=True)
    total, targets, logits_of = 0.0, 0, {}
    for i in range(0, len(rows), rows_per_batch):
        chunk = rows[i: i + rows_per_batch]
        batch = collator(chunk)
        logits = model(**{**batch.inputs, **extra_inputs}).logits
        loss = summed_loss(logits, batch.labels, "causal_lm")
        loss.backward()
        total += float(loss.detach())
        targets += batch.num_targets
        flat = "cu_seq_lens_q" in batch.inputs
        for (example, start), (b, at) in placements(chunk, batch.row_starts, flat).items():
            length = next(p.length for row in chunk for p in row if (p.example, p.start) == (example, start))
            logits_of[(example, start)] = logits[b, at: at + length].detach()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, targets, logits_of, grads


def run_loss(model, collator: Collator, rows: list[list[Piece]], rows_per_batch: int):
    """Summed loss and gradients over micro-batches, as the loop computes them (no logits:
    the target-only head has none)."""
    model.zero_grad(set_to_none=True)
    total, targets = 0.0, 0
    for i in range(0, len(rows), rows_per_batch):
        batch = collator(rows[i: i + rows_per_batch])
        loss = forward_summed_loss(model, batch.inputs, batch.labels, "causal_lm")
        loss.backward()
        total += float(loss.detach())
        targets += batch.num_targets
    return total, targets, {}, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(packed, padded, tol: float = 1e-5) -> None:
    loss_p, targets_p, logits_p, grads_p = packed
    loss_d, targets_d, logits_d, grads_d = padded
    assert targets_p == targets_d
    assert set(logits_p) == set(logits_d)
    for key in logits_d:
        torch.testing.assert_close(logits_p[key], logits_d[key], rtol=tol, atol=tol, msg=lambda m: f"document {key}: {m}")
    torch.testing.assert_close(torch.tensor(loss_p), torch.tensor(loss_d), rtol=tol, atol=tol)
    assert grads_p.keys() == grads_d.keys() and grads_p
    for name in grads_d:
        torch.testing.assert_close(grads_p[name], grads_d[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- boundaries in isolation


def test_packed_row_boundaries():
    docs = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    ds = make_dataset(docs, [[False, True, True], [True, True], [False, False, True, True]])
    rows = [[Piece(0, 0, 0, 3, True), Piece(0, 1, 0, 2, True), Piece(0, 2, 0, 4, True)]]
    collate = Collator([ds], "causal_lm", 12, True, "sdpa", PAD)
    batch = collate(rows)
    assert batch.inputs["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34, PAD, PAD, PAD]]
    assert batch.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    x = IGNORE_INDEX
    # first token of every document, prompt tokens and padding are no targets
    assert batch.labels.tolist() == [[x, 12, 13, x, 22, x, x, 33, 34, x, x, x]]
    assert batch.num_targets == 5 and batch.num_tokens == 9 and batch.num_slots == 12
    assert batch.inputs["use_cache"] is False
    mask = batch.inputs["attention_mask"][0, 0]
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    expected = (segment[:, None] == segment[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)

    eager = Collator([ds], "causal_lm", 12, True, "eager", PAD)(rows).inputs["attention_mask"][0, 0]
    assert eager.dtype == torch.float32
    assert torch.equal(eager == 0, expected) and bool((eager[~expected] == torch.finfo(torch.float32).min).all())

    # varlen: the two rows flattened into one stream, its 18 real tokens rounded up to 24 (a multiple of 8)
    varlen = Collator([ds], "causal_lm", 12, True, "varlen_reference", PAD)(rows + rows)
    assert varlen.inputs["input_ids"].shape == (1, 24) and varlen.labels.shape == (1, 24)
    assert varlen.inputs["input_ids"][0].tolist() == [11, 12, 13, 21, 22, 31, 32, 33, 34] * 2 + [PAD] * 6
    assert varlen.inputs["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3] * 2 + list(range(6))
    assert varlen.labels[0].tolist() == [x, 12, 13, x, 22, x, x, 33, 34] * 2 + [x] * 6
    assert varlen.inputs["cu_seq_lens_q"].dtype == torch.int32
    assert varlen.inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 12, 14, 18, 24]  # the padding tail is its own
    assert torch.equal(varlen.inputs["cu_seq_lens_k"], varlen.inputs["cu_seq_lens_q"])
    assert varlen.inputs["max_length_q"] == varlen.inputs["max_length_k"] == 6
    assert "attention_mask" not in varlen.inputs
    assert varlen.examples == {"docs": 6} and varlen.tokens == {"docs": 18}
    assert varlen.row_starts == [0, 9] and varlen.num_slots == 24 and varlen.capacity == 24


@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen_reference", "sdpa_varlen"])
def test_packed_micro_batches_compute_only_their_real_tokens(attention):
    """Rows filled unevenly (a long one, a short one): the masked layout is as wide as the longest
    row rounded up to 64 (not data.seq_len), the varlen one a single stream of the real tokens
    rounded up to 8; what is computed beyond the real tokens is that rounding only."""
    from trainer.data.collate import FLAT_MULTIPLE, ROW_MULTIPLE

    ds = random_documents(60, seed=9)
    rows = pack_pieces(pieces_of(ds), 256)
    rows = [rows[0], rows[-1][:1]] + [row[:2] for row in rows[1:5]]
    lengths = [sum(p.length for p in row) for row in rows]
    assert max(lengths) < 1024 - ROW_MULTIPLE and min(lengths) < 64
    batch = Collator([ds], "causal_lm", 1024, True, attention, PAD)(rows)
    assert batch.num_tokens == sum(lengths) and batch.capacity == len(rows) * 1024
    if attention in ("varlen_reference", "sdpa_varlen"):
        assert batch.inputs["input_ids"].shape == (1, batch.num_slots)
        assert batch.num_slots % FLAT_MULTIPLE == 0 and batch.num_slots - batch.num_tokens < FLAT_MULTIPLE
        cu = batch.inputs["cu_seq_lens_q"].tolist()
        assert cu[-1] == batch.num_slots and len(cu) == sum(len(row) for row in rows) + 1 + (batch.num_slots > sum(lengths))
    else:
        width = batch.inputs["input_ids"].shape[1]
        assert width % ROW_MULTIPLE == 0 and width - max(lengths) < ROW_MULTIPLE
        assert batch.inputs["attention_mask"].shape == (len(rows), 1, width, width)
        assert batch.num_slots == len(rows) * width
    # every document where row_starts and row_lengths say, with its own positions
    ids = batch.inputs["input_ids"].reshape(-1)
    positions = batch.inputs["position_ids"].reshape(-1)
    for row, start in zip(rows, batch.row_starts):
        at = start
        for piece in row:
            begin = int(ds.data.offsets[piece.example])
            assert ids[at: at + piece.length].tolist() == ds.data.tokens[begin: begin + piece.length].tolist()
            assert positions[at: at + piece.length].tolist() == list(range(piece.length))
            at += piece.length


def test_long_text_document_is_split_with_isolated_chunks():
    doc = list(range(1, 31))
    ds = make_dataset([doc], [[True] * 30], text=True, seq_len=12)
    pieces = ds.pieces(0, 0)
    assert [(p.start, p.length, p.first) for p in pieces] == [(0, 12, True), (12, 12, False), (24, 6, False)]
    batch = Collator([ds], "causal_lm", 12, True, "sdpa", PAD)([[p] for p in pieces])
    assert batch.inputs["input_ids"][1].tolist() == doc[12:24]
    assert batch.inputs["position_ids"][1].tolist() == list(range(12))  # a chunk starts over at 0
    assert batch.labels[1, 0] == IGNORE_INDEX and batch.labels[1, 1] == doc[13]
    assert batch.examples == {"docs": 1}  # a split document counts once, where it starts
    assert batch.tokens == {"docs": 30}


def test_packer_best_fit_decreasing_and_bounded_wait():
    packer = RowPacker(seq_len=10, max_wait=4)
    for i, n in enumerate([3, 7, 2, 5]):
        packer.add(Piece(0, i, 0, n, True))
    assert [p.length for p in packer.next_row()] == [7, 3]  # longest opens, best fit fills
    assert [p.length for p in packer.next_row()] == [5, 2]
    # a long-waiting short piece opens a row ahead of longer newcomers
    packer = RowPacker(seq_len=10, max_wait=2)
    packer.add(Piece(0, 0, 0, 4, True))
    for i in range(1, 5):
        packer.add(Piece(0, i, 0, 8, True))
    served = [packer.next_row()[0].example for _ in range(3)]
    assert served[:2] == [1, 2] and served[2] == 0


def test_pack_pieces_keeps_every_piece_once():
    ds = random_documents(50, seed=3)
    pieces = pieces_of(ds)
    rows = pack_pieces(pieces, SEQ_LEN)
    assert sorted(p for row in rows for p in row) == sorted(pieces)
    assert all(sum(p.length for p in row) <= SEQ_LEN for row in rows)
    assert sum(p.length for p in pieces) / (len(rows) * SEQ_LEN) > 0.9


# ----------------------------------------------------------------------------- packed == padded


@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen_reference", "sdpa_varlen"])
@pytest.mark.parametrize("rows_per_batch", [1, 3])
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_packed_equals_padded(tiny_tokenizer, tiny_llama_config, attention, rows_per_batch, peft):
    torch.manual_seed(0)
    ds = random_documents(14, seed=1)
    model = tiny_llama(tiny_tokenizer, tiny_llama_config, attention, peft)
    pieces = pieces_of(ds)
    packed_rows = pack_pieces(pieces, SEQ_LEN)
    assert any(len(row) > 2 for row in packed_rows)
    packed = run_batches(model, Collator([ds], "causal_lm", SEQ_LEN, True, attention, PAD), packed_rows, rows_per_batch)
    padded = run_batches(model, Collator([ds], "causal_lm", SEQ_LEN, False, attention, PAD),
                         [[p] for p in pieces], rows_per_batch)
    assert_same(packed, padded)
    if peft == "lora":
        assert any("lora_A" in n for n in packed[3]) and not any("embed_tokens" in n for n in packed[3])


@pytest.mark.parametrize("attention", ["sdpa", "varlen_reference", "sdpa_varlen"])
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_fused_loss_on_packed_rows_equals_the_plain_head_on_padded_rows(tiny_tokenizer, tiny_llama_config,
                                                                         attention, peft):
    """train.fused_loss keeps invariant 1: the target-only head on packed rows (flattened
    ones on varlen) gives the loss and gradients of the full logits on the same documents
    padded; and it equals the plain head on packed rows too."""
    torch.manual_seed(0)
    ds = random_documents(14, seed=1)
    pieces = pieces_of(ds)
    packed_rows = pack_pieces(pieces, SEQ_LEN)
    fused = tiny_llama(tiny_tokenizer, tiny_llama_config, attention, peft)
    plain = tiny_llama(tiny_tokenizer, tiny_llama_config, attention, peft, fused_loss=False)
    assert fused_head(fused) is not None and fused_head(plain) is None
    packed = Collator([ds], "causal_lm", SEQ_LEN, True, attention, PAD)
    padded = Collator([ds], "causal_lm", SEQ_LEN, False, attention, PAD)
    fused_packed = run_loss(fused, packed, packed_rows, 2)
    assert_same(fused_packed, run_loss(plain, padded, [[p] for p in pieces], 3))
    assert_same(fused_packed, run_loss(plain, packed, packed_rows, 2))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen_reference", "sdpa_varlen"])
def test_compiled_pad_free_packed_rows_equal_eager_padded_documents(tiny_tokenizer, tiny_llama_config, attention):
    """Invariant 1 with train.compile: decoder layers compiled (inductor), pad-free packed
    micro-batches of changing widths give every document the logits, and the step the loss
    and gradients (plain head and fused head), of the same documents padded one per row in an
    eager model with the same weights."""
    from trainer.model.compile import compile_decoder_layers

    torch.manual_seed(0)
    ds = random_documents(24, seed=6)
    pieces = pieces_of(ds)
    packed_rows = pack_pieces(pieces, SEQ_LEN)
    packed = Collator([ds], "causal_lm", SEQ_LEN, True, attention, PAD)
    widths = {tuple(packed(packed_rows[i: i + 2]).inputs["input_ids"].shape) for i in range(0, len(packed_rows), 2)}
    assert len(widths) > 1  # pad-free: the shapes change from micro-batch to micro-batch
    eager = tiny_llama(tiny_tokenizer, tiny_llama_config, attention)
    compiled = tiny_llama(tiny_tokenizer, tiny_llama_config, attention)
    assert compile_decoder_layers(compiled, torch.device("cpu"))
    padded = Collator([ds], "causal_lm", SEQ_LEN, False, attention, PAD)
    assert_same(run_batches(compiled, packed, packed_rows, 2), run_batches(eager, padded, [[p] for p in pieces], 3))
    assert_same(run_loss(compiled, packed, packed_rows, 2), run_loss(eager, padded, [[p] for p in pieces], 3))


def test_packed_text_chunks_equal_padded_chunks(tiny_tokenizer, tiny_llama_config):
    rng = np.random.default_rng(5)
    docs = [rng.integers(1, 300, n).tolist() for n in (150, 20, 70, 9)]
    ds = make_dataset(docs, [[True] * len(d) for d in docs], text=True)
    pieces = pieces_of(ds)
    assert len(pieces) > len(docs)
    model = tiny_llama(tiny_tokenizer, tiny_llama_config, "sdpa")
    packed = run_batches(model, Collator([ds], "causal_lm", SEQ_LEN, True, "sdpa", PAD), pack_pieces(pieces, SEQ_LEN), 2)
    padded = run_batches(model, Collator([ds], "causal_lm", SEQ_LEN, False, "sdpa", PAD), [[p] for p in pieces], 2)
    assert_same(packed, padded)


# ----------------------------------------------------------------------------- planted leaks


def test_check_fails_when_use_cache_is_left_on(tiny_tokenizer, tiny_llama_config):
    """Without an explicit mask, transformers isolates packed documents only by inferring
    them from position_ids, and only when no KV cache is built. Plant that trap: the same
    check that passes above must fail."""
    torch.manual_seed(0)
    ds = random_documents(8, seed=2)
    pieces = pieces_of(ds)
    packed_rows = pack_pieces(pieces, SEQ_LEN)
    model = tiny_llama(tiny_tokenizer, tiny_llama_config, "sdpa")
    padded = run_batches(model, Collator([ds], "causal_lm", SEQ_LEN, False, "sdpa", PAD), [[p] for p in pieces], 2)

    class PositionsOnly(Collator):  # packed rows relying on position_ids alone
        def __call__(self, rows):
            batch = super().__call__(rows)
            del batch.inputs["attention_mask"]
            return batch

    collate = PositionsOnly([ds], "causal_lm", SEQ_LEN, True, "sdpa", PAD)
    assert_same(run_batches(model, collate, packed_rows, 2, use_cache=False), padded)
    with pytest.raises(AssertionError):
        assert_same(run_batches(model, collate, packed_rows, 2, use_cache=True), padded)


def test_check_fails_when_boundary_labels_are_not_masked(tiny_tokenizer, tiny_llama_config):
    torch.manual_seed(0)
    ds = random_documents(8, seed=4)
    for e in range(len(ds.data)):  # every token a target, so only the boundary rule masks anything
        ds.data.targets[ds.data.offsets[e]: ds.data.offsets[e + 1]] = True
    pieces = pieces_of(ds)
    model = tiny_llama(tiny_tokenizer, tiny_llama_config, "sdpa")
    padded = run_batches(model, Collator([ds], "causal_lm", SEQ_LEN, False, "sdpa", PAD), [[p] for p in pieces], 2)

    class Unmasked(Collator):  # "forgets" to mask each document's first token
        def __call__(self, rows):
            batch = super().__call__(rows)
            batch.labels = torch.where(batch.inputs["input_ids"] != PAD, batch.inputs["input_ids"], IGNORE_INDEX)
            return batch

    rows = pack_pieces(pieces, SEQ_LEN)
    assert_same(run_batches(model, Collator([ds], "causal_lm", SEQ_LEN, True, "sdpa", PAD), rows, 2), padded)
    with pytest.raises(AssertionError):
        assert_same(run_batches(model, Unmasked([ds], "causal_lm", SEQ_LEN, True, "sdpa", PAD), rows, 2), padded)


# ----------------------------------------------------------------------------- debug layout


@pytest.mark.parametrize("attention", ["sdpa", "varlen_reference"])
def test_describe_batch_shows_documents_and_targets(tiny_tokenizer, attention):
    from trainer.data.collate import describe_batch

    texts = ["hello there", "the quick brown fox"]
    docs = [tiny_tokenizer(t)["input_ids"] for t in texts]
    ds = make_dataset(docs, [[i >= 2 for i in range(len(d))] for d in docs])
    rows = [[Piece(0, 0, 0, len(docs[0]), True), Piece(0, 1, 0, len(docs[1]), True)]]
    text = describe_batch(Collator([ds], "causal_lm", 32, True, attention, PAD)(rows), tiny_tokenizer)
    real = len(docs[0]) + len(docs[1])
    assert f"row 0: 2 document(s) [{len(docs[0])}, {len(docs[1])}], {real} tokens" in text
    width = 24 if attention == "varlen_reference" else 32  # a multiple of 8 flattened; a row at most seq_len
    assert f"{real} real tokens, {width - real} padding" in text
    assert f"rows filled to {100 * real / 32:.1f}% of data.seq_len" in text
    for doc in docs:
        prompt, target = tiny_tokenizer.decode(doc[:2]), tiny_tokenizer.decode(doc[2:])
        assert f"{prompt}⟦{target}⟧" in text
    assert ("flattened" in text) == (attention == "varlen_reference")


# ------------------------------------------------------------------ through the command line

DOC_WORDS = 15  # + EOS = 16 tokens: four documents fill a 64-token row exactly


def test_packed_and_padded_runs_log_equal_losses(tmp_path):
    rng = random.Random(0)
    docs = [{"text": " ".join(rng.choice(WORDS) for _ in range(DOC_WORDS))} for _ in range(8)]
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    tokenizer = word_tokenizer(tmp_path / "tokenizer")
    losses = {}
    for packing, rows_per_step in ((True, 2), (False, 8)):  # the whole dataset in every step
        cfg = causal_config(tmp_path / f"packing-{packing}",
                            model={"config": dict(TINY_LLAMA), "tokenizer": str(tokenizer)},
                            data={"seq_len": 64, "packing": packing,
                                  "datasets": [{"name": "docs", "path": str(data), "format": "text"}]},
                            optim={"lr": 1e-2, "warmup_steps": 0, "scheduler": "constant"},
                            train={"micro_batch_size": rows_per_step // 2, "global_batch_size": rows_per_step,
                                   "max_steps": 5, "log_every": 1})
        train_here(write_config(cfg, tmp_path / f"packing-{packing}.yaml"))
        out = Path(cfg["run"]["output_dir"])
        losses[packing] = step_losses(out)
        records = [r for r in read_metrics(out) if "loss" in r]
        assert all(r["tokens"] == 8 * (DOC_WORDS + 1 - 1) for r in records)  # every document's first token is no target
        assert all(r["packing_efficiency"] == 1.0 for r in records)
    assert sorted(losses[True]) == [1, 2, 3, 4, 5]
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=1e-5), step
    assert losses[True][5] < losses[True][1]  # it trained, so equality is not trivial
