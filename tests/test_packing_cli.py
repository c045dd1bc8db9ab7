"""Invariant 1 through the command line: packing changes nothing but speed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import TINY_LLAMA, write_jsonl
from runs import WORDS, causal_config, read_metrics, run_cli, step_losses, word_tokenizer, write_config

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
        run_cli(write_config(cfg, tmp_path / f"packing-{packing}.yaml"))
        out = Path(cfg["run"]["output_dir"])
        losses[packing] = step_losses(out)
        records = [r for r in read_metrics(out) if "loss" in r]
        assert all(r["tokens"] == 8 * (DOC_WORDS + 1 - 1) for r in records)  # every document's first token is no target
        assert all(r["packing_efficiency"] == 1.0 for r in records)
    assert sorted(losses[True]) == [1, 2, 3, 4, 5]
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=1e-5), step
    assert losses[True][5] < losses[True][1]  # it trained, so equality is not trivial
