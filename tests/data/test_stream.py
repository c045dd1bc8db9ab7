"""Invariant 5 and resumable sharded loading: exact mixing shares, per-epoch reshuffles,
identical streams after resume, disjoint rank shards whose union is the 1-rank stream,
and resume on another world size; the same at 200,000 memory-mapped examples."""

from __future__ import annotations

import mmap
import pickle
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from helpers import TINY_LLAMA, word_tokenizer, write_jsonl
from trainer.config.schema import load_config
from trainer.data.loader import build_train_loader
from trainer.data.mixing import RandomPermutation
from trainer.data.stream import GlobalStream

WORDS = "red green blue cat dog bird fish tree river stone cloud sun moon star apple bread".split()


def chat_rows(n: int, seed: int, min_words: int = 1, max_words: int = 12) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        rows.append({"messages": [{"role": "user", "content": f"{i}: " + " ".join(words)},
                                  {"role": "assistant", "content": " ".join(reversed(words))}]})
    return rows


def make_config(tmp_path: Path, datasets: list[tuple[str, int, float]], **data) -> object:
    """datasets: (name, rows, weight) chat files of different sizes."""
    entries = []
    for k, (name, rows, weight) in enumerate(datasets):
        path = write_jsonl(tmp_path / f"{name}.jsonl", chat_rows(rows, seed=k, max_words=4 + 6 * k))
        entries.append({"name": name, "path": str(path), "format": "chat", "weight": weight})
    train = data.pop("train", {})
    cfg = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 7},
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "train-bpe"},
        "data": {"seq_len": 256, "datasets": entries, "cache_dir": str(tmp_path / "cache"), **data},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 10, **train},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def drawn(loader, rows: int) -> list[tuple[int, int, int]]:
    """(data set, example, length) of the examples starting in the next `rows` rows."""
    out = []
    for _ in range(rows):
        out += [(p.dataset, p.example, p.length) for p in loader.stream.next_row() if p.first]
    return out


def window_shares(seq: list[tuple[int, int, int]], datasets: int, window: int, by: str) -> np.ndarray:
    """Share of each data set in every window of `window` consecutive examples: [windows, datasets]."""
    amount = np.array([1 if by == "examples" else n for _, _, n in seq], dtype=float)
    per = np.zeros((len(seq) + 1, datasets))
    for i, (d, _, _) in enumerate(seq):
        per[i + 1] = per[i]
        per[i + 1, d] += amount[i]
    sums = per[window:] - per[:-window]
    return sums / sums.sum(axis=1, keepdims=True)


# 1 % of a window; float slack so that exactly 1 % (10 of 1,000 examples) is within it
ONE_PERCENT = 0.01 + 1e-9


def flatten(batches) -> list[tuple]:
    return [(b.inputs["input_ids"].tolist(), b.labels.tolist(), b.examples, b.tokens) for b in batches]


WEIGHTS = [("task", 400, 0.6), ("general", 900, 0.3), ("small", 50, 0.1)]


@pytest.mark.parametrize("mix_by", ["examples", "tokens"])
def test_schedule_shares_within_one_percent_over_every_window(tmp_path, tiny_tokenizer, mix_by):
    cfg = make_config(tmp_path, WEIGHTS, packing=False, mix_by=mix_by)
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    seq = drawn(loader, 5000)
    shares = window_shares(seq, 3, 1000, mix_by)
    deviation = np.abs(shares - np.array([0.6, 0.3, 0.1])).max()
    assert deviation <= ONE_PERCENT, deviation
    if mix_by == "tokens":  # lengths differ by data set, so example shares are far from the weights
        assert np.abs(window_shares(seq, 3, 1000, "examples")[0] - [0.6, 0.3, 0.1]).max() > 0.05


@pytest.mark.parametrize("mix_by", ["examples", "tokens"])
def test_packed_stream_keeps_the_shares(tmp_path, tiny_tokenizer, mix_by):
    """Counted where examples start in packed rows (what the metrics report), the look-ahead
    buffer only reorders within a few rows."""
    cfg = make_config(tmp_path, WEIGHTS, packing=True, mix_by=mix_by)
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    seq = drawn(loader, 1200)
    assert len(seq) > 3000
    shares = window_shares(seq, 3, 1000, mix_by)
    assert np.abs(shares - np.array([0.6, 0.3, 0.1])).max() <= ONE_PERCENT


def test_best_fit_rows_are_a_function_of_the_seed(tmp_path, tiny_tokenizer):
    """Best-fit decreasing over the look-ahead window is deterministic: two loaders of the same
    config draw the same rows (so every rank, and a resumed run, sees the same stream); another
    run.seed shuffles, and so packs, differently. The rows are filled best-fit: no buffered piece
    that would have fitted a row's space is left out of it (checked on the packer's own buffer)."""
    cfg = make_config(tmp_path, WEIGHTS, packing=True)
    rows = [[build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1).stream.next_row() for _ in range(300)]
            for _ in range(2)]
    assert rows[0] == rows[1]
    cfg.run.seed += 1
    other = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    assert [other.stream.next_row() for _ in range(300)] != rows[0]
    stream = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1).stream
    checked = 0
    for _ in range(300):
        stream._fill()
        waiting = sorted(p.length for p in (entry[3] for entry in stream.packer._entries))
        row = stream.next_row()
        space = cfg.data.seq_len - sum(p.length for p in row)
        left = list(waiting)
        if any(piece.length not in left or left.remove(piece.length) for piece in row):
            continue  # an epoch boundary: the buffer drained and refilled within next_row
        assert not left or min(left) > space, (space, left[:5])
        checked += 1
    assert checked > 250


def test_each_example_once_per_epoch_of_its_data_set_reshuffled(tmp_path, tiny_tokenizer):
    cfg = make_config(tmp_path, WEIGHTS, packing=False)  # unpacked rows come in draw order
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    seq = drawn(loader, 6500)
    for d, ds in enumerate(loader.stream.datasets):
        order = [e for dd, e, _ in seq if dd == d]
        size = len(ds.examples)
        epochs = [order[i: i + size] for i in range(0, len(order) - size + 1, size)]
        assert len(epochs) >= 2
        for epoch in epochs:
            assert sorted(epoch) == list(ds.examples)
        assert epochs[0] != epochs[1]  # a new shuffle each epoch


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("mix_by", ["examples", "tokens"])
def test_identical_stream_after_resume(tmp_path, tiny_tokenizer, packing, mix_by):
    cfg = make_config(tmp_path, WEIGHTS, packing=packing, mix_by=mix_by)
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    for _ in range(37):
        loader.next_step(4)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert len(pickle.dumps(state)) < 20_000
    resumed = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    resumed.load_state_dict(state)
    for _ in range(60):  # crosses epoch boundaries of every data set
        assert flatten(resumed.next_step(4)) == flatten(loader.next_step(4))


@pytest.mark.parametrize("packing", [True, False])
def test_two_rank_shards_are_disjoint_and_make_the_one_rank_stream(tmp_path, tiny_tokenizer, packing):
    cfg = make_config(tmp_path, WEIGHTS, packing=packing)  # global batch 8 = 2 rows x 2 micro x 2 ranks
    single = build_train_loader(cfg, tiny_tokenizer, "varlen_reference", 0, 1)
    ranks = [build_train_loader(cfg, tiny_tokenizer, "varlen_reference", r, 2) for r in range(2)]
    for _ in range(20):
        shards = [loader.next_step(2) for loader in ranks]
        assert flatten(shards[0] + shards[1]) == flatten(single.next_step(4))
        ids = [{tuple(b.inputs["input_ids"].reshape(-1)[start: start + sum(lengths)].tolist())
                for b in shard for start, lengths in zip(b.row_starts, b.row_lengths)} for shard in shards]
        assert not ids[0] & ids[1]
        for shard in shards:
            assert "cu_seq_lens_q" in shard[0].inputs if packing else "attention_mask" in shard[0].inputs


def test_resume_two_ranks_on_one_rank(tmp_path, tiny_tokenizer):
    cfg = make_config(tmp_path, WEIGHTS, packing=True)
    reference = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    ranks = [build_train_loader(cfg, tiny_tokenizer, "sdpa", r, 2) for r in range(2)]
    for _ in range(15):
        reference.next_step(4)
        for loader in ranks:
            loader.next_step(2)
    states = [pickle.dumps(loader.state_dict()) for loader in ranks]
    assert states[0] == states[1]  # the state does not depend on the rank
    resumed = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    resumed.load_state_dict(pickle.loads(states[0]))
    for _ in range(10):
        assert flatten(resumed.next_step(4)) == flatten(reference.next_step(4))


class SlowCollator:
    """The loader's collator, slowed down, so that its background thread is still preparing while
    the test reads the loader's state (the test's assertions hold whatever the timing)."""

    def __init__(self, collator, seconds: float = 0.02):
        self.collator, self.seconds = collator, seconds

    def __call__(self, rows):
        time.sleep(self.seconds)
        return self.collator(rows)


@pytest.mark.parametrize("world_size", [1, 2])
def test_steps_prepared_ahead_leave_the_data_position_at_the_step_consumed(tmp_path, tiny_tokenizer, world_size):
    """Item 3 of the data path: with the next step prepared in the background, the batches are
    those of the plain loader, and the state a checkpoint would take at any moment (also while
    the thread is drawing rows) is the position after the steps handed out: resumed from it, on
    any world size, the stream continues with the step that was prepared but never trained."""
    cfg = make_config(tmp_path, WEIGHTS, packing=True)
    plain = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    ranks = [build_train_loader(cfg, tiny_tokenizer, "sdpa", r, world_size) for r in range(world_size)]
    for loader in ranks:
        loader.collator = SlowCollator(loader.collator)
    micro = 4 // world_size
    for step in range(12):
        shards = [loader.next_step(micro, prepare_next=True) for loader in ranks]
        assert flatten([b for shard in shards for b in shard]) == flatten(plain.next_step(4)), step
        expected = pickle.dumps(plain.state_dict())
        for _ in range(5):  # while the next step is being prepared
            assert all(pickle.dumps(loader.state_dict()) == expected for loader in ranks), step
        assert all(loader.prepared_ahead for loader in ranks)
        assert all(loader.stats == plain.stats for loader in ranks)
    state = ranks[0].state_dict()
    resumed = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    for _ in range(3):
        assert flatten(resumed.next_step(4, prepare_next=True)) == flatten(plain.next_step(4))
    resumed.close()  # the prepared step is dropped and the stream put back: nothing skipped
    assert not resumed.prepared_ahead
    assert flatten(resumed.next_step(4)) == flatten(plain.next_step(4))
    for loader in ranks:
        loader.close()


def test_resume_refuses_a_changed_stream(tmp_path, tiny_tokenizer):
    cfg = make_config(tmp_path, WEIGHTS, packing=True)
    state = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1).state_dict()
    cfg.data.packing = False
    with pytest.raises(ValueError, match="data.packing"):
        build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1).load_state_dict(state)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 65, 1000, 4097])
def test_random_permutation_is_a_permutation_and_differs_by_key(size):
    orders = [[RandomPermutation(size, [7, 1, epoch])[i] for i in range(size)] for epoch in range(2)]
    for order in orders:
        assert sorted(order) == list(range(size))
    if size >= 5:
        assert orders[0] != orders[1]
    with pytest.raises(IndexError):
        RandomPermutation(size, [7, 1, 0])[size]


def tokenized_parquet(path: Path, count: int, seed: int, vocab: int) -> Path:
    """`count` pre-tokenized examples of 4..40 ids; the first quarter of each is no target."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 41, count)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(2, vocab, int(starts[-1]))
    position = np.arange(len(ids)) - np.repeat(starts[:-1], lengths)
    labels = np.where(position < np.repeat(lengths // 4, lengths), -100, ids)
    pq.write_table(pa.table({"input_ids": pa.ListArray.from_arrays(starts, ids),
                             "labels": pa.ListArray.from_arrays(starts, labels)}), path)
    return path


@pytest.mark.slow
def test_two_hundred_thousand_examples_mix_and_resume_exactly(tmp_path):
    """Invariants 4 and 5 on memory-mapped data of 200k examples: two ranks split the
    1-rank stream, a checkpoint of a few hundred bytes resumes it exactly on one rank, and
    the shares hold over every window."""
    tokenizer = AutoTokenizer.from_pretrained(word_tokenizer(tmp_path / "tokenizer"))
    datasets = [{"name": name, "path": str(tokenized_parquet(tmp_path / f"{name}.parquet", count, seed, len(tokenizer))),
                 "format": "tokenized", "weight": weight}
                for name, count, seed, weight in (("big", 200_000, 0, 0.8), ("small", 5_000, 1, 0.2))]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"config": dict(TINY_LLAMA), "tokenizer": str(tmp_path / "tokenizer")},
        "data": {"seq_len": 64, "datasets": datasets, "cache_dir": str(tmp_path / "cache")},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 10},
        "logging": {"progress_bar": False}}))
    cfg = load_config(tmp_path / "config.yaml")
    reference = build_train_loader(cfg, tokenizer, "varlen_reference", 0, 1)
    big = reference.stream.datasets[0]
    assert len(big.examples) == 200_000 and isinstance(big.data.tokens.base.obj, mmap.mmap)  # mapped, not read
    ranks = [build_train_loader(cfg, tokenizer, "varlen_reference", r, 2) for r in range(2)]
    for _ in range(100):
        shards = [loader.next_step(2) for loader in ranks]
        assert flatten(shards[0] + shards[1]) == flatten(reference.next_step(4))
    state = pickle.dumps(ranks[0].state_dict())
    assert len(state) < 4_000
    resumed = build_train_loader(cfg, tokenizer, "varlen_reference", 0, 1)
    resumed.load_state_dict(pickle.loads(state))
    for _ in range(20):
        assert flatten(resumed.next_step(4)) == flatten(reference.next_step(4))
    seq = drawn(build_train_loader(cfg, tokenizer, "sdpa", 0, 1), 1500)
    assert np.abs(window_shares(seq, 2, 1000, "examples") - [0.8, 0.2]).max() <= ONE_PERCENT


def test_steps_per_epoch_padded_is_one_pass_over_the_primary(tmp_path, tiny_tokenizer):
    cfg = make_config(tmp_path, [("task", 96, 1.0)], packing=False)
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    assert loader.steps_per_epoch() == 96 / 8


def test_packed_epoch_is_a_clean_pass(tmp_path, tiny_tokenizer):
    """The packer drains at the end of each epoch of the primary data set: the rows of one
    epoch hold every example exactly once, and the next epoch starts on a fresh row."""
    cfg = make_config(tmp_path, [("task", 101, 1.0)], packing=True)
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    rows = loader.stream.epoch_rows()
    assert loader.steps_per_epoch() == rows / 8
    first = [p.example for _ in range(rows) for p in loader.stream.next_row()]
    assert sorted(first) == list(range(101))
    second = [p.example for _ in range(rows) for p in loader.stream.next_row()]
    assert sorted(second) == list(range(101)) and second != first


def test_epoch_rows_are_counted_once_per_stream(tmp_path, tiny_tokenizer, monkeypatch):
    cfg = make_config(tmp_path, [("task", 90, 0.9), ("general", 500, 0.1)], packing=True)
    counted = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1).steps_per_epoch()

    def no_counting(*_):
        raise AssertionError("counted again")

    with monkeypatch.context() as patch:
        patch.setattr(GlobalStream, "next_row", no_counting)
        assert build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1).steps_per_epoch() == counted
    cfg.data.datasets[1].weight = 0.2  # another stream: counted anew
    assert build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1).steps_per_epoch() != counted


def test_mixed_epoch_counts_rehearsal_at_its_weight(tmp_path, tiny_tokenizer):
    cfg = make_config(tmp_path, [("task", 90, 0.9), ("general", 500, 0.1)], packing=False)
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    assert loader.steps_per_epoch() == pytest.approx(100 / 8)  # 90 task + 10 rehearsal examples
    counts = Counter(d for d, _, _ in drawn(loader, 100))
    assert counts == {0: 90, 1: 10}


def test_batches_report_per_dataset_counts(tmp_path, tiny_tokenizer):
    cfg = make_config(tmp_path, WEIGHTS, packing=True)
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    batches = loader.next_step(4)
    for b in batches:
        assert set(b.examples) == {"task", "general", "small"}
        assert sum(b.tokens.values()) == b.num_tokens == int((b.inputs["input_ids"] != tiny_tokenizer.pad_token_id).sum())
        assert b.num_slots == 2 * 256
        assert isinstance(b.inputs["attention_mask"], torch.Tensor) and b.inputs["attention_mask"].shape == (2, 1, 256, 256)
        targets = b.labels != -100  # unshifted: a target is the input id at its position
        assert targets.any() and torch.equal(b.labels[targets], b.inputs["input_ids"][targets])
    assert loader.stats["small/epoch"] >= 0 and loader.stats["task/overlong_truncated"] == 0


def _rank_worker(rank: int, config_path: str, store: str, out: str) -> None:
    import torch.distributed as dist

    from helpers import TOY_TEXTS
    from trainer.model.tokenizer import train_bpe_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        tokenizer = train_bpe_tokenizer(TOY_TEXTS, TINY_LLAMA["vocab_size"])
        loader = build_train_loader(load_config(config_path), tokenizer, "sdpa", rank, 2)
        torch.save([flatten(loader.next_step(2)) for _ in range(3)], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_share_one_cache_and_split_the_stream(tmp_path, tiny_tokenizer):
    """Rank 0 tokenizes into the cache while rank 1 waits at the barrier, then reads it."""
    cfg = make_config(tmp_path, WEIGHTS, packing=True)
    torch.multiprocessing.spawn(_rank_worker, args=(str(tmp_path / "config.yaml"), str(tmp_path / "store"),
                                                   str(tmp_path / "steps")), nprocs=2)
    assert len([p for p in (tmp_path / "cache" / "tokenized").iterdir() if not p.name.startswith(".")]) == len(WEIGHTS)
    shards = [torch.load(tmp_path / f"steps.{rank}") for rank in range(2)]
    single = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    for step in range(3):
        assert shards[0][step] + shards[1][step] == flatten(single.next_step(4))


def _bad_data_rank(rank: int, config_path: str, store: str, out: str) -> None:
    import os

    import torch.distributed as dist

    from helpers import TOY_TEXTS
    from trainer.model.tokenizer import train_bpe_tokenizer
    from trainer.runtime.errors import DataError

    os.environ["LOCAL_RANK"] = str(rank)  # one node: rank 0 tokenizes, rank 1 waits for it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        tokenizer = train_bpe_tokenizer(TOY_TEXTS, TINY_LLAMA["vocab_size"])
        build_train_loader(load_config(config_path), tokenizer, "sdpa", rank, 2)
    except DataError as err:
        Path(f"{out}.{rank}").write_text(str(err))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_bad_row_found_by_the_tokenizing_rank_stops_every_rank_with_its_message(tmp_path):
    cfg = make_config(tmp_path, [("task", 40, 1.0)], packing=True)
    path = Path(cfg.data.datasets[0].path)
    path.write_text(path.read_text() + '{"messages": []}\n')
    torch.multiprocessing.spawn(_bad_data_rank, args=(str(tmp_path / "config.yaml"), str(tmp_path / "store"),
                                                     str(tmp_path / "error")), nprocs=2)
    messages = [(tmp_path / f"error.{rank}").read_text() for rank in range(2)]
    assert messages[0] == messages[1] and messages[0].startswith(f"{path}:41: empty conversation")
