"""Checkpoints written before a change of code resume exactly: the committed checkpoint of the
flat layout (tests/fixtures/checkpoint_before_layout) continues where its run stopped."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from helpers import REPO, read_metrics, train_here, write_config

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_before_layout"


def test_a_checkpoint_of_the_flat_layout_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "step-00000004", run / "checkpoints" / "step-00000004")
    data = shutil.copy(FIXTURE / "data" / "sft.jsonl", tmp_path / "sft.jsonl")
    cfg = yaml.safe_load((FIXTURE / "step-00000004" / "config.yaml").read_text())
    cfg["run"]["output_dir"] = str(run)
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg["data"]["datasets"][0]["path"] = str(data)  # where a data file lives may change on resume
    train_here(write_config(cfg, tmp_path / "config.yaml"))

    expected = [json.loads(line) for line in (FIXTURE / "uninterrupted_metrics.jsonl").read_text().splitlines()]
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed if "loss" in r] == [5, 6, 7, 8]  # continued after step 4, each step once
    later = [r for r in expected if r["step"] > 4]
    assert len(later) == len(resumed)
    for before, now in zip(later, resumed):
        assert now["step"] == before["step"]
        for key in ("lr", "tokens", "data/sft/examples", "data/sft/tokens"):
            assert now.get(key) == before.get(key), key  # the schedule and the data order are the same
        # the same arithmetic on the same weights; a CPU of another kind may round the last bits differently
        for key in ("loss", "grad_norm", "eval/sft/loss"):
            if key in before:
                assert now[key] == pytest.approx(before[key], rel=1e-5), key
