"""A rank's side of faults (trainer/runtime/faults.py): non-finite steps dropped on every rank alike and the
run stopped on them, collective timeouts lowered after the first step, one line when one fires."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import REPO, causal_config, read_metrics, run_cli, trainer_env, write_config
from trainer.checkpoint.layout import complete_checkpoints
from trainer.checkpoint.trainer_state import read_trainer_state
from trainer.config.schema import load_config
from trainer.runtime.errors import ConfigError


def test_fault_keys_have_torchtitan_like_defaults_and_are_checked(tmp_path):
    cfg = causal_config(tmp_path)
    path = write_config(cfg, tmp_path / "config.yaml")
    loaded = load_config(path)
    assert (loaded.parallel.init_timeout_s, loaded.parallel.step_timeout_s) == (300, 100)
    assert (loaded.train.on_nonfinite, loaded.train.max_skipped_steps) == ("stop", 10)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["parallel.step_timeout_s=0", "train.max_skipped_steps=0", "train.on_nonfinite=ignore"])
    lines = str(err.value).splitlines()
    assert any(line.startswith("parallel.step_timeout_s: must be > 0") for line in lines), lines
    assert any(line.startswith("train.max_skipped_steps: must be >= 1") for line in lines), lines
    assert any(line.startswith("train.on_nonfinite: 'ignore' is not one of stop, skip") for line in lines), lines


@pytest.mark.slow
def test_every_strategy_drops_a_nonfinite_step_on_every_rank_without_a_trace(tmp_path):
    """NaN in the forward of one rank only: every rank marks the step and drops its update; the
    weights, optimizer state and schedule end as if the step had never run."""
    strategies = ["fsdp", "zero2", "zero3"]  # ddp and single drop it in the same TorchStrategy.step as fsdp
    out = tmp_path / "probe.json"
    env = dict(trainer_env(), TORCH_EXTENSIONS_DIR=extensions_dir())
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                           "c10d", "--rdzv-endpoint", "localhost:0", str(REPO / "tests" / "workers" / "nonfinite_probe.py"),
                           str(out), *strategies], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads(out.read_text())
    for name in strategies:
        got = results[name]
        assert got["flags"] == [[False, False], [True, True], [False, False]], name
        assert got["lrs"][1:] == [got["lrs_without"][1]] * 2, name  # the schedule did not move on
        assert got["changed_by_dropped"] == 0.0, name
        assert got["vs_without"] == pytest.approx(0.0, abs=1e-7), name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def extensions_dir() -> str:
    """DeepSpeed compiles a CPU op on first use: the same folder as tests/parallel/test_strategies.py's."""
    import tempfile

    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path(tempfile.gettempdir()) / f"finetrain-torch-extensions-{os.getuid()}")


# lr 1e4 without clipping: the first update is finite, the next step's gradients are not.
DIVERGING = dict(optim={"lr": 1e4, "max_grad_norm": 0, "warmup_steps": 0})


def checkpoint_state(checkpoint: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "dcp", target)
    return torch.load(target, weights_only=False)


def all_finite(state: dict) -> bool:
    tensors = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    return bool(tensors) and all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.slow
def test_a_nonfinite_step_stops_the_run_in_one_line_and_saves_nothing(tmp_path):
    cfg = causal_config(tmp_path, train={"max_steps": 8, "log_every": 1, "save_every": 1}, **DIVERGING)
    proc = run_cli(write_config(cfg, tmp_path / "config.yaml"), check=False)
    out = Path(cfg["run"]["output_dir"])
    good = out / "checkpoints" / "step-00000001"
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("finetrain:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(rf"finetrain: step 2: loss \S+, gradient norm nan \(train\.on_nonfinite=stop\): stopped, "
                        rf"nothing saved; the last good checkpoint is {re.escape(str(good))} .*", lines[0]), lines[0]
    assert complete_checkpoints(out / "checkpoints") == [good]
    assert not list((out / "checkpoints").glob(".incomplete-*"))
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and records[1]["grad_norm"] is None
    assert all_finite(checkpoint_state(good, tmp_path))


@pytest.mark.slow
def test_skipped_steps_are_counted_and_the_weights_stay_finite(tmp_path):
    """With `skip` the diverged steps drop their update (the weights saved after them are those of
    the last good step) until max_skipped_steps in a row stop the run."""
    cfg = causal_config(tmp_path, train={"max_steps": 8, "log_every": 1, "save_every": 1, "on_nonfinite": "skip",
                                         "max_skipped_steps": 3},
                        checkpoint={"keep_last": 10}, **DIVERGING)
    proc = run_cli(write_config(cfg, tmp_path / "config.yaml"), check=False)
    out = Path(cfg["run"]["output_dir"])
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("finetrain:")]
    assert len(lines) == 1 and "3 steps in a row had their update skipped (train.max_skipped_steps=3)" in lines[0]
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    assert [r["lr"] for r in records[1:]] == [records[1]["lr"]] * 3  # the schedule waits for an applied update
    saved = complete_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == ["step-00000001", "step-00000002", "step-00000003"]
    first, last = checkpoint_state(saved[0], tmp_path), checkpoint_state(saved[-1], tmp_path)
    assert all_finite(last)
    for key, value in first["model"].items():
        assert torch.equal(value, last["model"][key]), key
    assert read_trainer_state(saved[-1])["skipped_steps"] == 2


TIMEOUT_PROBE = textwrap.dedent("""
    import os, sys, time, types
    sys.path.insert(0, {repo!r})
    import torch
    from trainer.runtime import faults
    from trainer.runtime.distributed import init_distributed
    from trainer.rank import RankOutcome
    faults.start(types.SimpleNamespace(init_timeout_s=60, step_timeout_s=2))
    dist_info = init_distributed(faults.collective_timeout_s(60))
    faults.step_done(1)  # from here on steps run under parallel.step_timeout_s
    faults.enter("compute", 2)
    if dist_info.rank == 1:
        time.sleep(30)
        os._exit(0)
    started = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
    except Exception as err:
        kind = faults.collective_failure(err)
        print("after", round(time.monotonic() - started), kind, flush=True)
        os._exit(faults.report_collective_failure(err, kind))
    os._exit(0)
""")


def test_under_plain_torchrun_a_lowered_collective_timeout_ends_a_rank_in_one_line(tmp_path):
    """No finetrain launcher: after the first step collectives time out after step_timeout_s, and the
    rank that sees it says so in one line, exit code 4."""
    script = tmp_path / "probe.py"
    script.write_text(TIMEOUT_PROBE.format(repo=str(REPO)))
    env = dict(trainer_env(), MASTER_ADDR="localhost", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    env.pop("FINETRAIN_WATCH_DIR", None)
    ranks = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        stdout, stderr = ranks[0].communicate(timeout=120)
    finally:
        for proc in ranks:
            proc.kill()
    assert ranks[0].returncode == 4, stderr[-3000:]
    after, kind = stdout.split()[1:]
    assert kind == "timeout" and 2 <= int(after) < 20, stdout
    assert stderr.strip().splitlines() == [
        "finetrain: rank 0: a collective with the other ranks timed out after 2 s in step 2 (compute): another rank "
        "hung or died (its stack: kill -URG PID); nothing was saved since the last checkpoint"], stderr
