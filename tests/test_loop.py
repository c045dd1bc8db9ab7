"""End to end through the CLI: the loss falls, metrics are complete, resume is exact."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from helpers import (causal_config, read_metrics, run_cli, run_history, start_cli, step_losses, train_here,
                     wait_for_records,
                     write_config)
from trainer.checkpoint.layout import COMPLETE_MARK, complete_checkpoints


@pytest.mark.slow
def test_tiny_run_learns_and_logs_every_step(tmp_path):
    cfg = causal_config(tmp_path, rows=96, train={"max_steps": 24, "log_every": 3, "eval_every": 12},
                        data={"eval": {"fraction": 0.1}})
    run_cli(write_config(cfg, tmp_path / "config.yaml"))
    out = Path(cfg["run"]["output_dir"])
    records = read_metrics(out)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(3, 25, 3))
    assert train_records[-1]["loss"] < 0.85 * train_records[0]["loss"]
    first = train_records[0]
    for key in ("lr", "grad_norm", "tokens", "tokens_per_s", "packing_efficiency", "padding_tokens", "row_fill",
                "data_wait_s", "data/sft/examples", "data/sft/tokens"):
        assert key in first, key
    assert first["tokens"] > 0 and 0 < first["packing_efficiency"] <= 1 and 0 < first["row_fill"] <= 1
    # pad-free rows (sdpa: as wide as the longest, rounded up to 64): the padding is what remains
    for r in train_records:
        assert r["padding_tokens"] == round(r["tokens_per_s"] * r["step_time_s"] * (1 / r["packing_efficiency"] - 1))
    # cumulative per-dataset counters grow
    assert train_records[-1]["data/sft/examples"] > first["data/sft/examples"]
    eval_records = [r for r in records if "eval/sft/loss" in r]
    assert [r["step"] for r in eval_records] == [0, 12, 24]  # step 0: the baseline for forgetting
    assert eval_records[-1]["eval/sft/loss_change"] == pytest.approx(eval_records[-1]["eval/sft/loss"] - eval_records[0]["eval/sft/loss"])
    assert eval_records[-1]["eval/sft/loss"] < eval_records[0]["eval/sft/loss"] * 1.05
    assert (out / "config.yaml").is_file()
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000024"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,ranks,resume_ranks,sequence", [(signal.SIGTERM, 1, [1], 1), (signal.SIGUSR1, 1, [1], 1),
                                                             (signal.SIGTERM, 2, [2, 1], 2)],
                         ids=["SIGTERM", "SIGUSR1", "SIGTERM-2-sequence-ranks-resumed-on-2-and-1"])
def test_resume_after_signal_is_exact(tmp_path, sig, ranks, resume_ranks, sequence):
    """Stopped by a signal, resumed from its checkpoint (on each of `resume_ranks` ranks,
    from copies of the stopped run), the run logs the uninterrupted run's losses. On 2 ranks the
    stopped run is sequence-parallel (parallel.sequence_parallel 2: both ranks read the same rows,
    each computes half of every row), the uninterrupted one on one process (in this one: the same
    global batch, summed in another order), and the copies resume on 2 ranks with sequence
    parallelism and on 1 rank without it."""
    steps = 60 if ranks == 1 else 30  # two ranks start slower; fewer steps keep the test short
    sections = dict(train={"max_steps": steps, "log_every": 1, "save_every": steps // 3},
                    optim={"lr": 3e-3, "warmup_steps": 5})
    if sequence > 1:  # held-out loss (sharded like training) and greedy answers (unsharded) too
        sections["data"] = {"eval": {"fraction": 0.1, "generate": 2, "max_new_tokens": 8}}
    launch = ["--nproc", str(ranks)] if ranks > 1 else []
    reference = causal_config(tmp_path / "reference", rows=96, **sections)
    train_here(write_config(reference, tmp_path / "reference.yaml"))
    expected = step_losses(Path(reference["run"]["output_dir"]))
    assert sorted(expected) == list(range(1, steps + 1))

    sections["parallel"] = {"sequence_parallel": sequence}
    cfg = causal_config(tmp_path / "stopped", rows=96, logging={"progress_bar": False, "wandb": {"mode": "offline"}},
                        **sections)
    config_path = write_config(cfg, tmp_path / "stopped.yaml")
    out = Path(cfg["run"]["output_dir"])
    proc = start_cli(config_path, *launch)
    signalled_after = steps // 3 + 5
    wait_for_records(out / "metrics.jsonl", signalled_after, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=300)
    stderr = proc.stderr.read()
    assert code == 0, stderr[-4000:]  # also through the launcher of --nproc
    # the step after the stop was already prepared (data prepared while a step runs); it is dropped
    assert "the next step's data, prepared ahead, is discarded" in stderr, stderr[-4000:]
    saved = complete_checkpoints(out / "checkpoints")
    stopped_at = int(saved[-1].name.split("-")[1])
    assert signalled_after <= stopped_at < steps, stopped_at
    stopped = json.loads((out / "summary.json").read_text())  # what was done so far
    assert (stopped["status"], stopped["steps"], stopped["checkpoint"]) == ("stopped", stopped_at, str(saved[-1]))
    # A folder that was never sealed (as after kill -9 mid-save) must be ignored by resume.
    (out / "checkpoints" / "step-00000099").mkdir()
    (out / "checkpoints" / "step-00000099" / "trainer_state.json").write_text("garbage")

    for resumed_ranks in resume_ranks:
        copy = tmp_path / f"resumed-on-{resumed_ranks}"
        shutil.copytree(out, copy)
        run_cli(config_path, *(["--nproc", str(resumed_ranks)] if resumed_ranks > 1 else []), f"run.output_dir={copy}",
                f"parallel.sequence_parallel={sequence if resumed_ranks == ranks else 1}")
        resumed = step_losses(copy)
        assert sorted(resumed) == list(range(1, steps + 1)), "every step logged exactly once across the two runs"
        finished = json.loads((copy / "summary.json").read_text())
        assert (finished["status"], finished["steps"]) == ("finished", steps)
        assert finished["wall_time_s"] > stopped["wall_time_s"]  # the summary covers both processes
        # another world size than the reference's, or another split of the rows, sums in another order
        tolerance = 1e-6 if resumed_ranks == ranks == 1 else 1e-5
        for step in range(1, steps + 1):
            assert resumed[step] == pytest.approx(expected[step], rel=tolerance, abs=tolerance / 10), step
        lines = (copy / "metrics.jsonl").read_text().splitlines()
        assert len([line for line in lines if '"loss"' in line]) == steps
        if sequence > 1:  # the held-out loss at step 0 and at the end, and answers generated at both
            evals = [r for r in read_metrics(copy) if "eval/sft/loss" in r]
            wanted = [r for r in read_metrics(Path(reference["run"]["output_dir"])) if "eval/sft/loss" in r]
            assert [r["step"] for r in evals] == [r["step"] for r in wanted] == [0, steps]
            for got, want in zip(evals, wanted):
                assert got["eval/sft/loss"] == pytest.approx(want["eval/sft/loss"], rel=1e-5)
            generated = [json.loads(line) for line in (copy / "generations.jsonl").read_text().splitlines()]
            assert sorted({row["step"] for row in generated}) == [0, steps]
        # W&B: both processes logged into one run, each step once, the same values as metrics.jsonl
        run_id, history = run_history(copy)
        logged = {row["_step"]: row["loss"] for row in history if "loss" in row}
        assert sorted(logged) == list(range(1, steps + 1))
        assert all(logged[step] == pytest.approx(resumed[step]) for step in logged)


@pytest.mark.slow
def test_resume_after_kill_between_saves_is_exact(tmp_path):
    """kill -9 after step 30 with saves every 20: resume from 20 and repeat 21-30 identically."""
    steps = 40
    sections = dict(train={"max_steps": steps, "log_every": 1, "save_every": 20})
    reference = causal_config(tmp_path / "reference", rows=96, **sections)
    train_here(write_config(reference, tmp_path / "reference.yaml"))
    expected = step_losses(Path(reference["run"]["output_dir"]))

    cfg = causal_config(tmp_path / "killed", rows=96, **sections)
    config_path = write_config(cfg, tmp_path / "killed.yaml")
    out = Path(cfg["run"]["output_dir"])
    proc = start_cli(config_path)
    wait_for_records(out / "metrics.jsonl", 30, proc)
    proc.kill()
    proc.wait()
    assert [p.name for p in complete_checkpoints(out / "checkpoints")][-1] in ("step-00000020", "step-00000040")
    run_cli(config_path)
    records = [r for r in read_metrics(out) if "loss" in r]
    last = {r["step"]: r["loss"] for r in records}  # a repeated step keeps its later value
    for step in range(1, steps + 1):
        assert last[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_incomplete_checkpoint_folders_are_ignored(tmp_path):
    directory = tmp_path / "checkpoints"
    for name, complete in [("step-00000010", True), ("step-00000020", False), (".incomplete-step-00000030", True)]:
        (directory / name).mkdir(parents=True)
        if complete:
            (directory / name / COMPLETE_MARK).write_text(json.dumps({"step": 1}))
    assert [p.name for p in complete_checkpoints(directory)] == ["step-00000010"]


@pytest.mark.slow
def test_debug_mode_prints_first_batch_and_runs_few_steps(tmp_path):
    cfg = causal_config(tmp_path, train={"max_steps": 100})
    proc = run_cli(write_config(cfg, tmp_path / "config.yaml"), "--debug")
    losses = step_losses(Path(cfg["run"]["output_dir"]))
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert "row 0" in proc.stdout, proc.stdout[-2000:]
    # the end-of-turn check of the chat data, before the first batch
    assert ("end-of-turn check (finetrain's ChatML template): '<|im_end|>' is a target at the end of all 16 assistant "
            "turns of the first 16 rows of sft") in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_resume_with_a_changed_config_follows_the_new_schedule(tmp_path):
    """A finished 4-step run extended to 8 steps with another optim.lr: every resumed step runs at
    the new schedule's rate (cosine over 8 steps from the new lr), the changes are listed once; a
    key the checkpoint cannot continue with (data.seq_len) is refused in one line, exit 2."""
    from trainer.config.schema import OptimConfig
    from trainer.optim import lr_multiplier

    cfg = causal_config(tmp_path, optim={"lr": 3e-3, "warmup_steps": 0}, train={"max_steps": 4})
    config = write_config(cfg, tmp_path / "config.yaml")
    run_cli(config)
    out = Path(cfg["run"]["output_dir"])
    resumed = run_cli(config, "train.max_steps=8", "optim.lr=1e-3")
    assert "optim.lr: 0.003 -> 0.001" in resumed.stderr and "train.max_steps: 4 -> 8" in resumed.stderr
    logged = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    schedule = OptimConfig(lr=1e-3, warmup_steps=0)
    assert sorted(logged) == list(range(1, 9))
    for step in range(5, 9):  # step k's update uses the rate of 0-based step k - 1
        assert logged[step] == pytest.approx(1e-3 * lr_multiplier(step - 1, schedule, 8), rel=1e-6), step
    refused = run_cli(config, "train.max_steps=12", "data.seq_len=128", check=False)
    lines = [line for line in refused.stderr.splitlines() if line.startswith("finetrain:")]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert "data.seq_len: 64 -> 128 differs from the checkpoint's config" in lines[0]
    assert "Traceback" not in refused.stderr
