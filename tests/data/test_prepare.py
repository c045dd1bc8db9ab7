"""`finetrain prepare`: tokenizes ahead of a run into the cache the run then maps, and stops
on a config mistake or a bad row with one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, causal_config, run_cli, step_losses, train_here, trainer_env, write_config, write_jsonl


def prepare(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "prepare", str(config), *args], capture_output=True,
                          text=True, cwd=REPO, env=trainer_env(), timeout=600)


@pytest.mark.slow
def test_prepare_then_train_logs_the_losses_of_train_alone(tmp_path):
    sections = dict(data={"eval": {"fraction": 0.1}}, train={"max_steps": 6, "log_every": 1})
    alone = causal_config(tmp_path / "alone", **sections)
    train_here(write_config(alone, tmp_path / "alone.yaml"))

    prepared = causal_config(tmp_path / "prepared", **sections)
    config = write_config(prepared, tmp_path / "prepared.yaml")
    done = prepare(config, "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sft: 64 examples" in done.stdout, done.stdout
    trained = run_cli(config)
    assert "tokenized" not in trained.stderr, "train tokenized again instead of mapping the prepared cache"
    assert step_losses(Path(prepared["run"]["output_dir"])) == step_losses(Path(alone["run"]["output_dir"]))


@pytest.mark.slow
def test_prepare_stops_on_a_config_mistake_or_a_bad_row_with_one_line(tmp_path):
    cfg = causal_config(tmp_path)
    config = write_config(cfg, tmp_path / "config.yaml")
    mistake = prepare(config, "data.seq_lenn=32")
    assert mistake.returncode == 2 and "unknown key data.seq_lenn; did you mean data.seq_len?" in mistake.stderr

    data = Path(cfg["data"]["datasets"][0]["path"])
    write_jsonl(data, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
                       {"messages": [{"role": "user", "content": "hi"}]}])
    bad = prepare(config, "--workers", "1")
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("finetrain:")]
    assert errors == [f"finetrain: {data}:2: conversation has no assistant turn (nothing to train on) "
                      "(set data.on_bad_row=skip to skip bad rows)"], bad.stderr[-3000:]
