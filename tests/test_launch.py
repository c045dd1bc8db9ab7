"""Launching N local ranks through `finetrain train --nproc N`: a run, and a crash that must not hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from runs import causal_config, read_metrics, run_cli, step_losses, trainer_env, write_config


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_two_ranks_match_one_rank_and_write_no_temp_files_outside_the_run(tmp_path):
    sections = dict(train={"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 6, "log_every": 1})
    one = causal_config(tmp_path / "one", **sections)
    run_cli(write_config(one, tmp_path / "one.yaml"))
    two = causal_config(tmp_path / "two", parallel={"strategy": "ddp", "mixed_precision": "fp32"}, **sections)
    run_cli(write_config(two, tmp_path / "two.yaml"), "--nproc", "2")
    expected, got = step_losses(Path(one["run"]["output_dir"])), step_losses(Path(two["run"]["output_dir"]))
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    # tokens are counted over both ranks
    one_tokens = [r["tokens"] for r in read_metrics(Path(one["run"]["output_dir"])) if "tokens" in r]
    two_tokens = [r["tokens"] for r in read_metrics(Path(two["run"]["output_dir"])) if "tokens" in r]
    assert one_tokens == two_tokens


@pytest.mark.slow
def test_a_crashed_rank_ends_the_job_quickly_with_its_error(tmp_path):
    cfg = causal_config(tmp_path, parallel={"strategy": "ddp", "mixed_precision": "fp32"},
                        train={"max_steps": 100000, "log_every": 1})
    config_path = write_config(cfg, tmp_path / "config.yaml")
    # its own session, so that whatever happens the whole job can be killed at the end
    launcher = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config_path), "--nproc", "2"],
                                cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        metrics = Path(cfg["run"]["output_dir"]) / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3):
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.time() < deadline, "the run never started"
            time.sleep(0.1)
        workers = children(launcher.pid)  # `finetrain train --nproc` execs torchrun, whose children are the ranks
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        killed_at = time.time()
        code = launcher.wait(timeout=120)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code != 0
    assert time.time() - killed_at < 90, "the surviving rank hung"
    stderr = launcher.stderr.read()
    assert "SIGKILL" in stderr or "Signal 9" in stderr, stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_resume_on_another_world_size_continues_the_curve(tmp_path, strategy):
    """Train 6 steps on 2 ranks, resume to 12 on 1 rank: steps 7-12 match an uninterrupted 2-rank run."""
    sections = dict(parallel={"strategy": strategy, "mixed_precision": "fp32"},
                    optim={"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant"},
                    train={"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 12, "log_every": 1})
    reference = causal_config(tmp_path / "reference", **sections)
    run_cli(write_config(reference, tmp_path / "reference.yaml"), "--nproc", "2")
    expected = step_losses(Path(reference["run"]["output_dir"]))

    resumed = causal_config(tmp_path / "resumed", **sections)
    config_path = write_config(resumed, tmp_path / "resumed.yaml")
    run_cli(config_path, "--nproc", "2", "train.max_steps=6")
    run_cli(config_path)  # one rank, same folder: resumes from step 6
    got = step_losses(Path(resumed["run"]["output_dir"]))
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
