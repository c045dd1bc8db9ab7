"""Launching N local ranks through `finetrain train --nproc N`: a run, stops, resumes, and ranks that die or hang."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, causal_config, read_metrics, run_cli, step_losses, train_here, trainer_env, write_config
from launch.rank_watch import agent_ranks
from trainer.checkpoint.layout import complete_checkpoints
from trainer.runtime.faults import WATCH_DIR_ENV


@pytest.mark.slow
def test_two_ranks_match_one_rank_and_write_no_temp_files_outside_the_run(tmp_path):
    sections = dict(train={"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 6, "log_every": 1})
    one = causal_config(tmp_path / "one", **sections)
    train_here(write_config(one, tmp_path / "one.yaml"))
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


class StderrLines:
    """The launcher's stderr, line by line as it arrives, with the time each came."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc) -> None:
        for line in proc.stderr:
            self.lines.append((time.time(), line.rstrip("\n")))

    def since(self, moment: float) -> list[str]:
        self.thread.join(timeout=30)
        return [line for at, line in self.lines if at >= moment]


@pytest.mark.slow
def test_a_killed_rank_is_one_line_naming_it_and_the_others_tracebacks_go_to_their_logs(tmp_path):
    cfg = causal_config(tmp_path, parallel={"strategy": "ddp", "mixed_precision": "fp32"},
                        train={"max_steps": 100000, "log_every": 1})
    config_path = write_config(cfg, tmp_path / "config.yaml")
    out = Path(cfg["run"]["output_dir"])
    launcher = start_in_session(str(config_path), "--nproc", "2")
    stderr = StderrLines(launcher)
    try:
        wait_for_losses(out, 3, [launcher])
        ranks = agent_ranks(launcher.pid)
        assert sorted(ranks) == [0, 1], ranks
        killed_at = time.time()
        os.kill(ranks[1], signal.SIGKILL)  # as the kernel's OOM killer does
        code = launcher.wait(timeout=120)
    finally:
        kill_group(launcher)
    assert code == 1
    assert time.time() - killed_at < 90, "the surviving rank hung"
    after = stderr.since(killed_at)
    assert 1 <= len(after) <= 3, after
    assert any(line.startswith("finetrain: rank 1 was killed by SIGKILL") for line in after), after
    assert str(out / "logs" / "rank-1.log") in "\n".join(after)
    # the surviving rank's consequential traceback is in its log, not on the terminal
    assert not any("Traceback" in line or "gloo" in line for at, line in stderr.lines), after
    assert "Traceback" in (out / "logs" / "rank-0.log").read_text()


@pytest.mark.slow
def test_resume_on_another_world_size_continues_the_curve(tmp_path, strategy="fsdp"):
    """Train 6 steps on 2 ranks, resume to 12 on 1 rank: steps 7-12 match an uninterrupted 2-rank run.
    Through the command line on fsdp; every strategy's checkpoint resumes on another world size in
    tests/parallel/test_strategies.py::test_resume_on_another_world_size_continues_the_curve."""
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


def wait_for_losses(output_dir: Path, count: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    metrics = output_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= count):
        for proc in procs:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the run never got going"
        time.sleep(0.1)


def start_in_session(*args: str) -> subprocess.Popen:
    """`finetrain train ...` as the leader of a new process group (as a shell job is)."""
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", *args], cwd=REPO, env=trainer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def assert_follows(got: dict, expected: dict, steps: int) -> None:
    assert sorted(got) == list(range(1, steps + 1)), "every step logged exactly once across the runs"
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


STOP_SECTIONS = dict(parallel={"strategy": "fsdp", "mixed_precision": "fp32"},
                     train={"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 40, "log_every": 1})


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory) -> dict:
    """The uninterrupted run on one node with two ranks."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = causal_config(tmp, rows=96, **STOP_SECTIONS)
    run_cli(write_config(cfg, tmp / "config.yaml"), "--nproc", "2")
    return step_losses(Path(cfg["run"]["output_dir"]))


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits_0(tmp_path, reference_curve):
    cfg = causal_config(tmp_path, rows=96, **STOP_SECTIONS)
    config_path = write_config(cfg, tmp_path / "config.yaml")
    out = Path(cfg["run"]["output_dir"])
    launcher = start_in_session(str(config_path), "--nproc", "2")
    try:
        wait_for_losses(out, 10, [launcher])
        os.killpg(launcher.pid, signal.SIGTERM)  # what Slurm, Kubernetes or a terminal do
        code = launcher.wait(timeout=300)
    finally:
        kill_group(launcher)
    stderr = launcher.stderr.read()
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    saved = complete_checkpoints(out / "checkpoints")
    assert saved and 10 <= int(saved[-1].name.split("-")[1]) < 40
    run_cli(config_path, "--nproc", "2")
    assert_follows(step_losses(out), reference_curve, 40)


def stop_during_a_step(pid: int, from_step: int) -> dict:
    """SIGSTOP rank `pid` while its heartbeat says it is in step `from_step` or a later one, not in a
    checkpoint or an evaluation (those run under the longer parallel.init_timeout_s); returns that
    heartbeat. The heartbeat file lags the rank by up to a second (written by a thread): a beat of
    an earlier step is waited out, the rank let go on meanwhile."""
    environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    beat_file = Path(environ[WATCH_DIR_ENV.encode()].decode()) / f"rank-{int(environ[b'RANK'])}.json"
    deadline = time.time() + 60
    while True:
        os.kill(pid, signal.SIGSTOP)
        beat = json.loads(beat_file.read_text())  # what the launcher sees: a stopped rank writes no more
        in_a_step = beat["phase"] in ("data", "compute", "end of step") and beat["step"] >= from_step
        if in_a_step or time.time() > deadline:
            return beat
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_named_with_the_stacks_and_the_run_resumes_exactly(tmp_path, reference_curve):
    """SIGSTOP one of 2 ranks after step 3 with parallel.step_timeout_s=20: the launcher exits 4
    within 60 s with one line naming the stopped rank, the other rank's stack is in a file, the
    checkpoint of step 2 is intact and the run resumes from it on the reference curve."""
    cfg = causal_config(tmp_path, rows=96, **STOP_SECTIONS)
    cfg["parallel"]["step_timeout_s"] = 20
    cfg["train"]["save_every"] = 2
    config_path = write_config(cfg, tmp_path / "config.yaml")
    out = Path(cfg["run"]["output_dir"])
    launcher = start_in_session(str(config_path), "--nproc", "2")
    stderr = StderrLines(launcher)
    ranks: dict[int, int] = {}
    try:
        wait_for_losses(out, 3, [launcher])
        ranks = agent_ranks(launcher.pid)
        beat = stop_during_a_step(ranks[1], from_step=3)
        stopped_at = time.time()
        assert beat["step"] >= 3, beat  # step 3 done (metrics.jsonl has it), or a later one under way
        code = launcher.wait(timeout=120)
        took = time.time() - stopped_at
    finally:
        kill_group(launcher)
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    after = stderr.since(stopped_at)
    assert code == 4, after
    assert took < 60, took
    # rank 0's progress lines (a background save that completes) may come too; the report is one line
    reports = [line for line in after if not line.startswith("[")]
    assert len(reports) == 1 and reports[0].startswith(f"finetrain: rank 1 (pid {ranks[1]}) made no progress for "), after
    assert "parallel.step_timeout_s=20" in reports[0] and "its process is stopped" in reports[0], after
    stacks = list((out / "logs").glob("stacks-*.txt"))
    assert len(stacks) == 1 and str(stacks[0]) in reports[0]
    text = stacks[0].read_text()
    assert "==== rank 0," in text and "trainer/loop.py" in text and "cannot write its stack" in text, text
    saved = complete_checkpoints(out / "checkpoints")
    assert saved and saved[-1].name >= "step-00000002"
    run_cli(config_path, "--nproc", "2")
    assert_follows(step_losses(out), reference_curve, 40)


@pytest.mark.slow
def test_two_nodes_equal_one_node_and_resume_after_sigterm_to_both(tmp_path, reference_curve):
    """Two agents with one rank each, rendezvousing over c10d on localhost, stand in for two
    nodes: they follow the 1 node x 2 ranks curve, a SIGTERM to both saves, and the resumed
    two-node run continues the curve."""
    cfg = causal_config(tmp_path, rows=96, **STOP_SECTIONS)
    config_path = write_config(cfg, tmp_path / "config.yaml")
    out = Path(cfg["run"]["output_dir"])

    def start_nodes(port: int) -> list[subprocess.Popen]:
        return [start_in_session(str(config_path), "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"localhost:{port}")
                for _ in range(2)]

    nodes = start_nodes(free_port())
    with killed_at_the_end(nodes):
        wait_for_losses(out, 10, nodes)
        for node in nodes:
            os.killpg(node.pid, signal.SIGTERM)
        codes, stderrs = ended(nodes, timeout=300)
    assert codes == [0, 0], [s[-2000:] for s in stderrs]
    assert not any("Traceback" in s for s in stderrs), [s[-2000:] for s in stderrs]
    assert complete_checkpoints(out / "checkpoints")

    nodes = start_nodes(free_port())
    with killed_at_the_end(nodes):
        codes, stderrs = ended(nodes, timeout=600)
    assert codes == [0, 0], [s[-2000:] for s in stderrs]
    assert_follows(step_losses(out), reference_curve, 40)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def killed_at_the_end(nodes: list[subprocess.Popen]):
    """Whatever a test leaves of the launchers it started (in sessions of their own) is killed."""
    try:
        yield
    finally:
        for node in nodes:
            kill_group(node)


def ended(nodes: list[subprocess.Popen], timeout: float) -> tuple[list[int], list[str]]:
    """Each launcher's exit code and stderr, once all have ended."""
    codes = [node.wait(timeout=timeout) for node in nodes]
    return codes, [node.stderr.read() for node in nodes]


@pytest.mark.slow
def test_a_repeated_signal_is_one_request_and_a_later_second_kills(tmp_path):
    """Slurm and the launcher may deliver one stop twice within a moment: that is one request.
    A second signal after the repeat window ends the process at once."""
    script = tmp_path / "stop.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from trainer.loop import StopSignal\n"
        "stop = StopSignal()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(0.2)\n"
        "print('requested', stop.requested, flush=True)\n"
        "time.sleep(StopSignal.REPEAT_WINDOW_S + 0.5)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
        "print('survived', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["requested", "True"], proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGTERM


def restart_records(output_dir: Path) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "restart" in r]


def assert_each_step_once(output_dir: Path, steps: int) -> None:
    logged = [r["step"] for r in read_metrics(output_dir) if "loss" in r]
    assert sorted(logged) == list(range(1, steps + 1)), logged


@pytest.mark.slow
def test_two_nodes_restart_after_a_killed_rank_rejoin_the_rendezvous_and_resume_exactly(tmp_path, reference_curve):
    """Two agents of one rank each (two nodes on localhost, c10d) with --max-restarts 1: SIGKILL to
    the rank of one node after step 11; that node's agent restarts its rank, the other node's agent
    restarts its own (it lost contact), both rejoin the rendezvous, resume from the newest sealed
    checkpoint (step 10, or 5 when the kill came before 10 was sealed) and finish on the
    uninterrupted curve, every step logged once."""
    cfg = causal_config(tmp_path, rows=96, **STOP_SECTIONS)
    cfg["train"]["save_every"] = 5
    config_path = write_config(cfg, tmp_path / "config.yaml")
    out = Path(cfg["run"]["output_dir"])
    port = free_port()
    nodes = [start_in_session(str(config_path), "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint",
                              f"localhost:{port}", "--max-restarts", "1") for _ in range(2)]
    with killed_at_the_end(nodes):
        wait_for_losses(out, 11, nodes)
        victim = agent_ranks(nodes[1].pid) or agent_ranks(nodes[0].pid)
        os.kill(next(iter(victim.values())), signal.SIGKILL)
        codes, stderrs = ended(nodes, timeout=600)
    assert codes == [0, 0], [s[-3000:] for s in stderrs]
    said = [line for s in stderrs for line in s.splitlines() if line.startswith("finetrain: restart 1 of 1: ")]
    assert 1 <= len(said) <= 2 and any("was killed by SIGKILL" in line for line in said), said
    assert_follows(step_losses(out), reference_curve, 40)
    assert_each_step_once(out, 40)
    (record,) = restart_records(out)
    assert record["resumed_from"] in (5, 10) and record["steps_recomputed"] >= 1, record  # 10 once sealed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps_recomputed"] == record["steps_recomputed"]


@pytest.mark.slow
def test_under_plain_torchrun_max_restarts_a_killed_rank_restarts_and_resumes_exactly(tmp_path, reference_curve):
    """`torchrun --max-restarts 1 -m trainer`: rank 1 killed after step 12; torchrun's agent restarts
    the worker group, rank 0 of the new attempt says the restart in one line (the rank that left no
    report), records it, and the run finishes on the uninterrupted curve."""
    cfg = causal_config(tmp_path, rows=96, **STOP_SECTIONS)
    cfg["train"]["save_every"] = 6
    config_path = write_config(cfg, tmp_path / "config.yaml")
    out = Path(cfg["run"]["output_dir"])
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                 "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
                                 "-m", "trainer", str(config_path)], cwd=REPO, env=trainer_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_losses(out, 13, [torchrun])
        os.kill(agent_ranks(torchrun.pid)[1], signal.SIGKILL)
        code = torchrun.wait(timeout=600)
    finally:
        kill_group(torchrun)
    stderr = torchrun.stderr.read()
    assert code == 0, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("finetrain: ")]
    assert len(said) == 1 and said[0].startswith("finetrain: restart 1 of 1: rank 1 ended without a report"), said
    assert "resumed from step 12" in said[0] or "resumed from step 6" in said[0], said  # 12 once sealed
    assert_follows(step_losses(out), reference_curve, 40)
    assert_each_step_once(out, 40)
    assert restart_records(out)[0]["rank"] == 1


@pytest.mark.slow
def test_a_diverged_run_is_never_restarted(tmp_path):
    """lr 1e4 without clipping diverges at step 2 (exit 3). `finetrain train --max-restarts 2` ends
    there in one line, without a restart; under plain `torchrun --max-restarts 1`, whose agent
    restarts any failure, the ranks of the restarted attempt end before they start training, with the
    same line and code (the run journal says how the attempt before it ended)."""
    cfg = causal_config(tmp_path, parallel={"strategy": "ddp", "mixed_precision": "fp32"},
                        optim={"lr": 1e4, "max_grad_norm": 0, "warmup_steps": 0})
    config_path = write_config(cfg, tmp_path / "config.yaml")
    proc = run_cli(config_path, "--nproc", "2", "--max-restarts", "2", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("finetrain: ")]
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("finetrain: step 2: loss ") and "restart" not in lines[0], lines
    out = Path(cfg["run"]["output_dir"])
    assert (out / "logs" / "rank-0.log").read_text().count("==== ") == 1  # one attempt

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts",
                           "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "trainer",
                           str(config_path), "checkpoint.resume=never", "run.overwrite=true"],
                          cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("finetrain: ")]
    assert proc.returncode != 0 and len(lines) >= 2 and len(set(lines)) == 1, lines  # (each rank of attempt 2 says it)
    assert not [r for r in read_metrics(out) if "loss" in r and r["step"] > 2]
