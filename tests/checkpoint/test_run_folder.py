"""One run per folder: a second run into a folder in use stops with one line naming the holder;
a fresh run into a folder that holds an earlier run stops unless told to replace it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, causal_config, read_metrics, run_cli, trainer_env, write_config
from trainer.checkpoint.layout import complete_checkpoints
from trainer.checkpoint.run_folder import LOCK_FILE, claim_run_folder
from trainer.config.schema import Config
from trainer.runtime.errors import UserError


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_lock_is_held_until_released_and_names_its_holder(tmp_path):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "run")
    lock = claim_run_folder(cfg)
    holder = (tmp_path / "run" / LOCK_FILE).read_text().strip()
    assert re.fullmatch(rf"host \S+, pid {os.getpid()}", holder)
    # Another process cannot take it while this one holds it.
    probe = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
             "from trainer.config.schema import Config\nfrom trainer.checkpoint.run_folder import claim_run_folder\n"
             f"cfg = Config(); cfg.run.output_dir = {cfg.run.output_dir!r}\nclaim_run_folder(cfg)"]
    refused = subprocess.run(probe, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and f"is in use by another run ({holder})" in refused.stderr, refused.stderr
    lock.release()
    assert subprocess.run(probe, capture_output=True, text=True, timeout=120).returncode == 0


def test_a_fresh_run_refuses_a_folder_with_an_earlier_run_unless_told_to_replace_it(tmp_path):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "run")
    cfg.checkpoint.resume = "never"
    (tmp_path / "run" / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "run" / "tokenizer").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds an earlier run \(metrics\.jsonl, checkpoints\); a fresh run "
                                        r"\(checkpoint\.resume=never\) would mix with it: set run\.overwrite=true"):
        claim_run_folder(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    cfg.run.overwrite = True
    claim_run_folder(cfg).release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt", LOCK_FILE]


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_exits_2_and_the_first_goes_on(tmp_path):
    """Two ranks train; a second `finetrain train` into the same folder stops at once with one
    line naming the host and pid of the first run's rank 0, which finishes untouched. Then a
    fresh run into the finished run's folder is refused, and with run.overwrite replaces it."""
    cfg = causal_config(tmp_path, rows=96, train={"max_steps": 40, "log_every": 1, "save_every": 10})
    config = write_config(cfg, tmp_path / "config.yaml")
    out = Path(cfg["run"]["output_dir"])
    first = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config), "--nproc", "2"], cwd=REPO,
                             env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    paused: list[int] = []
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text()):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        # Hold the first run still (its ranks keep the lock) while the second one starts up.
        paused = [first.pid, *descendants(first.pid)]
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        second = run_cli(config, check=False)
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        line = one_line(second)
        match = re.fullmatch(rf"finetrain: run\.output_dir: {re.escape(str(out))} is in use by another run "
                             r"\(host (\S+), pid (\d+)\); wait for it to end, or set another run\.output_dir", line)
        assert match, line
        assert int(match.group(2)) in paused[1:]  # the first run's rank 0
        assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
            os.killpg(first.pid, signal.SIGKILL)
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 41))  # every step once: nothing of the second run mixed in
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000030", "step-00000040"]

    line = one_line(run_cli(config, "checkpoint.resume=never", check=False))
    assert re.fullmatch(rf"finetrain: run\.output_dir: {re.escape(str(out))} holds an earlier run \(config\.yaml, "
                        r"metrics\.jsonl, summary\.json, checkpoints\); a fresh run \(checkpoint\.resume=never\) would "
                        r"mix with it: set run\.overwrite=true to replace it, or set another run\.output_dir", line), line
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == steps

    line = one_line(run_cli(config, "run.overwrite=true", check=False))
    assert line == ("finetrain: run.overwrite: replaces an earlier run with a fresh one, but checkpoint.resume is auto "
                    "(continue it); set checkpoint.resume=never to start over (override run.overwrite=true)"), line

    run_cli(config, "checkpoint.resume=never", "run.overwrite=true", "train.max_steps=3")
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000003"]


def descendants(pid: int) -> set[int]:
    found, queue = set(), [pid]
    while queue:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(queue.pop())], capture_output=True, text=True).stdout
        children = [int(x) for x in out.split()]
        found.update(children)
        queue += children
    return found
