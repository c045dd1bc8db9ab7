"""`finetrain submit` against a real one-node Slurm cluster (slurm/start-local-cluster.sh).

Two CPU ranks per job (`--gpus-per-node 0 --tasks-per-node 2`), one CPU each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, causal_config, read_metrics, run_cli, step_losses, trainer_env, write_config

pytestmark = pytest.mark.slow

STEPS = 150  # about 6 s of steps: time to signal the job mid-run
CPU_JOB = ["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10"]


@pytest.fixture(scope="module")
def slurm_cluster():
    """Start the local cluster unless one already answers; stop it afterwards only if started here."""
    running = shutil.which("scontrol") is not None and subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(REPO / "slurm" / "start-local-cluster.sh")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"start-local-cluster.sh failed:\n{proc.stdout}\n{proc.stderr}"
    yield
    if not running:
        subprocess.run(["bash", str(REPO / "slurm" / "stop-local-cluster.sh")], capture_output=True, timeout=60)


def submit(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "submit", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, env=trainer_env(), timeout=120)


def submitted_job_id(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"finetrain submit exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def is_listed(job_id: str) -> bool:
    """squeue lists a job while pending, running or completing."""
    return bool(subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip())


def job_logs(output_dir: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((output_dir / "slurm").rglob("*_log.*")))


def wait_for_job(job_id: str, output_dir: Path, expect: str = "COMPLETED", timeout_s: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") \
                and not is_listed(job_id):  # finished, its processes too
            assert fields["JobState"] == expect, f"job {job_id}: {fields['JobState']}\n{job_logs(output_dir)}"
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still {fields['JobState']} after {timeout_s} s\n{job_logs(output_dir)}")


def wait_for_steps(output_dir: Path, steps: int, timeout_s: float = 60) -> None:
    path = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {steps} steps logged in {timeout_s} s\n{job_logs(output_dir)}")


def test_submit_trains_on_two_ranks_like_one_process(tmp_path, slurm_cluster):
    cfg = causal_config(tmp_path / "slurm")
    config = write_config(cfg, tmp_path / "slurm.yaml")
    output_dir = Path(cfg["run"]["output_dir"])
    job_id = submitted_job_id(submit(config, *CPU_JOB))
    wait_for_job(job_id, output_dir)

    script = (output_dir / "slurm" / job_id / f"{job_id}_submission.sh").read_text()
    assert "--ntasks-per-node=2" in script and "--cpus-per-task=1" in script and "--time=10" in script
    assert "--requeue" in script and "--signal=USR2@120" in script and "gpus" not in script
    assert "strategy fsdp on 2 rank(s)" in (output_dir / "slurm" / job_id / f"{job_id}_0_log.err").read_text()
    losses = step_losses(output_dir)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1]

    # the same global batch on one process gives the same updates (invariant 2)
    single = causal_config(tmp_path / "single")
    run_cli(write_config(single, tmp_path / "single.yaml"))
    reference = step_losses(Path(single["run"]["output_dir"]))
    assert losses == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("stop_signal", ["USR2", "USR1"])  # USR2: submitit's time-limit signal
def test_signalled_job_checkpoints_requeues_and_resumes(tmp_path, slurm_cluster, stop_signal):
    cfg = causal_config(tmp_path, train={"max_steps": STEPS})
    config = write_config(cfg, tmp_path / "cfg.yaml")
    output_dir = Path(cfg["run"]["output_dir"])
    job_id = submitted_job_id(submit(config, *CPU_JOB))
    wait_for_steps(output_dir, 20)
    subprocess.run(["scancel", f"--signal={stop_signal}", job_id], check=True)
    fields = wait_for_job(job_id, output_dir)

    assert fields["Restarts"] == "1", job_logs(output_dir)
    saved = sorted(int(p.name.split("-")[1]) for p in (output_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 2 and 20 <= saved[0] < STEPS and saved[1] == STEPS, saved
    log = (output_dir / "slurm" / job_id / f"{job_id}_0_log.err").read_text()
    assert f"resumed from {output_dir / 'checkpoints' / f'step-{saved[0]:08d}'}" in log
    records = [r for r in read_metrics(output_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # every step once, across the requeue
    examples = [r["data/sft/examples"] for r in records]
    assert all(b > a for a, b in zip(examples, examples[1:]))  # the data position carried over


def test_cancelled_job_saves_and_stays_cancelled(tmp_path, slurm_cluster):
    cfg = causal_config(tmp_path, train={"max_steps": STEPS})
    config = write_config(cfg, tmp_path / "cfg.yaml")
    output_dir = Path(cfg["run"]["output_dir"])
    job_id = submitted_job_id(submit(config, *CPU_JOB))
    wait_for_steps(output_dir, 20)
    subprocess.run(["scancel", job_id], check=True)
    fields = wait_for_job(job_id, output_dir, expect="CANCELLED")
    assert fields["Restarts"] == "0", job_logs(output_dir)
    saved = [int(p.name.split("-")[1]) for p in (output_dir / "checkpoints").glob("step-*")]
    steps = [r["step"] for r in read_metrics(output_dir) if "loss" in r]
    assert saved == [steps[-1]] and 20 <= steps[-1] < STEPS, (saved, steps[-1])


def test_bad_config_is_refused_before_submitting(tmp_path, slurm_cluster):
    cfg = causal_config(tmp_path)
    config = write_config(cfg, tmp_path / "cfg.yaml")
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    proc = submit(config, *CPU_JOB, "optim.lrr=1e-3")
    assert proc.returncode == 2 and "optim.lrr" in proc.stderr
    proc = submit(config, *CPU_JOB[:-2], "--time", "0")
    assert proc.returncode == 2 and "slurm.time_min" in proc.stderr
    proc = submit(config, "--gpus-per-node", "2", "--tasks-per-node", "1")
    assert proc.returncode == 2 and "one task per GPU" in proc.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout == before
    assert not (Path(cfg["run"]["output_dir"]) / "slurm").exists()


def sbatch(config: Path, output_dir: Path) -> str:
    """`sbatch slurm/train.sbatch CONFIG` with two CPU tasks on the one node: two launchers
    with one rank each, rendezvousing as two nodes would."""
    output_dir.mkdir(parents=True, exist_ok=True)
    env = {**trainer_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["sbatch", "--parsable", "--nodes", "1", "--ntasks-per-node", "2", "--cpus-per-task", "1",
                           "--time", "10", "--output", str(output_dir / "sbatch-%j.out"),
                           str(REPO / "slurm" / "train.sbatch"), str(config)],
                          capture_output=True, text=True, cwd=output_dir, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


@pytest.mark.parametrize("stop", ["scontrol requeue", "USR1 to the batch script"])
def test_sbatch_script_trains_stops_requeues_and_resumes_exactly(tmp_path, slurm_cluster, stop):
    sections = dict(train={"max_steps": STEPS, "log_every": 1, "micro_batch_size": 2, "global_batch_size": 4})
    reference = causal_config(tmp_path / "reference", **sections)
    run_cli(write_config(reference, tmp_path / "reference.yaml"))
    expected = step_losses(Path(reference["run"]["output_dir"]))

    cfg = causal_config(tmp_path / "job", **sections)
    config = write_config(cfg, tmp_path / "job.yaml")
    output_dir = Path(cfg["run"]["output_dir"])
    job_id = sbatch(config, output_dir)
    wait_for_steps(output_dir, 20)
    if stop == "scontrol requeue":  # Slurm sends SIGTERM to every process of the job, then requeues it
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    else:  # as at the time limit: the script passes it to the ranks, then requeues the job itself
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    fields = wait_for_job(job_id, output_dir, timeout_s=300)

    log = (output_dir / f"sbatch-{job_id}.out").read_text()
    assert fields["Restarts"] == "1", log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    saved = sorted(int(p.name.split("-")[1]) for p in (output_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 2 and 20 <= saved[0] < STEPS and saved[1] == STEPS, saved
    assert f"resumed from {output_dir / 'checkpoints' / f'step-{saved[0]:08d}'}" in log
    got = step_losses(output_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(got)], rel=1e-4)


def job_process(job_id: str, variable: bytes, command_part: str) -> int:
    """The pid of the process of Slurm job `job_id` whose environment holds `variable` (b"RANK=1")
    and whose command line holds `command_part`, once it runs."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"SLURM_JOB_ID={job_id}".encode() in environ and variable in environ and command_part in command:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no process of job {job_id} with {variable!r}")


def test_sbatch_job_restarts_a_killed_rank_within_the_job_and_resumes_exactly(tmp_path, slurm_cluster):
    """slurm/train.sbatch runs `finetrain train`, which takes slurm.max_restarts (3 by default) inside
    a Slurm job: rank 1 killed after step 20, the launchers restart their ranks, which resume from
    the newest sealed checkpoint; the job completes without a requeue, each step logged once, on the
    uninterrupted curve."""
    sections = dict(train={"max_steps": 60, "log_every": 1, "micro_batch_size": 2, "global_batch_size": 4,
                           "save_every": 10})
    reference = causal_config(tmp_path / "reference", **sections)
    run_cli(write_config(reference, tmp_path / "reference.yaml"))
    expected = step_losses(Path(reference["run"]["output_dir"]))

    cfg = causal_config(tmp_path / "job", **sections)
    output_dir = Path(cfg["run"]["output_dir"])
    job_id = sbatch(write_config(cfg, tmp_path / "job.yaml"), output_dir)
    wait_for_steps(output_dir, 21)
    os.kill(job_process(job_id, b"RANK=1", "-m trainer"), signal.SIGKILL)
    fields = wait_for_job(job_id, output_dir, timeout_s=300)

    log = (output_dir / f"sbatch-{job_id}.out").read_text()
    assert fields["Restarts"] == "0", log[-3000:]
    said = [line for line in log.splitlines() if line.startswith("finetrain: restart 1 of 3: ")]
    assert said and any("was killed by SIGKILL" in line for line in said), log[-3000:]
    records = read_metrics(output_dir)
    (restart,) = [r for r in records if "restart" in r]
    assert restart["resumed_from"] in (10, 20) and restart["rank"] == 1, restart  # 20 once sealed
    got = step_losses(output_dir)
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, 61))
    assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(got)], rel=1e-4)


def test_submitted_job_is_requeued_after_a_killed_rank_and_resumes(tmp_path, slurm_cluster):
    """finetrain submit (one task per rank, no launcher): rank 1's task killed after step 20; rank 0
    loses it, requeues the job (slurm.max_restarts), and the requeued job resumes from the newest
    checkpoint, reports the restart, and completes with every step logged once."""
    cfg = causal_config(tmp_path, train={"max_steps": STEPS, "save_every": 10})
    config = write_config(cfg, tmp_path / "cfg.yaml")
    output_dir = Path(cfg["run"]["output_dir"])
    job_id = submitted_job_id(submit(config, *CPU_JOB))
    wait_for_steps(output_dir, 21)
    os.kill(job_process(job_id, b"SLURM_PROCID=1", "submitit"), signal.SIGKILL)
    fields = wait_for_job(job_id, output_dir, timeout_s=300)

    assert fields["Restarts"] == "1", job_logs(output_dir)
    records = read_metrics(output_dir)
    (restart,) = [r for r in records if "restart" in r]
    assert restart["resumed_from"] in (10, 20) and restart["rank"] == 1, restart
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, STEPS + 1))
    log = (output_dir / "slurm" / job_id / f"{job_id}_0_log.err").read_text()
    assert "finetrain: restart 1 of 3: rank 1 ended without a report" in log, log[-3000:]
    assert json.loads((output_dir / "summary.json").read_text())["restarts"] == 1


def test_submitting_leaves_the_logging_of_the_process_as_it_was():
    """submitit sets logging up as it is imported (logging.config.dictConfig), closing every
    handler the process has: one writing to a stream it owns (absl's, installed by ROUGE's import)
    closed that stream, and `finetrain submit` run in-process broke whatever wrote there. Imported
    for `finetrain submit`, it closes none, its records reach the process's handlers, and the
    environment the job inherits is the one before."""
    code = """
import logging, os
closed = []
class Handler(logging.StreamHandler):
    def close(self):
        closed.append(self)
        super().close()
logging.basicConfig(level=logging.INFO, handlers=[Handler()])
from launch.submit import import_submitit
submitit = import_submitit()
assert not closed, "a handler was closed"
assert "SUBMITIT_LOG_LEVEL" not in os.environ
assert logging.getLogger("submitit").getEffectiveLevel() == logging.INFO
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=trainer_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
