"""The launcher's watch (launch/rank_watch.py) over stand-in ranks that beat as trainer/runtime/faults.py does:
a hung run is ended, the stopped rank named, the other ranks' stacks written; a rank still within
its bound holds the watch off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO
from launch.rank_watch import RankWatch
from trainer.runtime.faults import WATCH_DIR_ENV

# A rank after its first step (parallel.step_timeout_s=1), in `phase` of step 2, then waiting for good
# (as in a collective that never returns), its heartbeat thread still running.
STAND_IN = """
import sys, time, types
sys.path.insert(0, {repo!r})
from trainer.runtime import faults
faults.start(types.SimpleNamespace(init_timeout_s=60, step_timeout_s=1))
faults.step_done(1)
faults.enter(sys.argv[1], 2)
print("ready", flush=True)
while True:
    time.sleep(0.2)
"""


@pytest.fixture
def stand_ins(tmp_path):
    started: list[subprocess.Popen] = []
    watch = RankWatch(tmp_path / "run", 60, lambda: [proc.pid for proc in started])
    script = tmp_path / "rank.py"
    script.write_text(STAND_IN.format(repo=str(REPO)))

    def start(*phases: str) -> list[subprocess.Popen]:
        watch.log_dir.mkdir(parents=True, exist_ok=True)
        for rank, phase in enumerate(phases):
            env = dict(os.environ, RANK=str(rank), **{WATCH_DIR_ENV: str(watch.directory)})
            started.append(subprocess.Popen([sys.executable, str(script), phase], env=env, stdout=subprocess.PIPE,
                                            text=True, start_new_session=True))
            assert started[-1].stdout.readline().strip() == "ready"  # one after the other: rank 0 waits longest
            time.sleep(0.3)  # a change of phase is on file within 0.1 s
        return started

    yield watch, start
    for proc in started:
        proc.kill()
        proc.wait()
    watch.stop()


def wait_past_bound(seconds: float = 2.5) -> None:
    time.sleep(seconds)  # the stand-ins' step bound is 1 s; their heartbeats run every second


def test_a_stopped_rank_is_named_and_the_others_leave_their_stacks(stand_ins):
    watch, start = stand_ins
    ranks = start("compute", "compute")
    os.kill(ranks[1].pid, signal.SIGSTOP)
    wait_past_bound()
    assert watch.check()
    assert watch.verdict.startswith(f"rank 1 (pid {ranks[1].pid}) made no progress for "), watch.verdict
    assert "in step 2 (compute; parallel.step_timeout_s=1): its process is stopped" in watch.verdict
    stacks = list(watch.log_dir.glob("stacks-*.txt"))
    assert len(stacks) == 1 and str(stacks[0]) in watch.verdict
    text = stacks[0].read_text()
    rank0, rank1 = text.split("==== rank 1,")
    assert "time.sleep" in rank0 or "in <module>" in rank0, text  # rank 0's own stack
    assert "cannot write its stack" in rank1
    for proc in ranks:
        assert proc.wait(timeout=10) == -signal.SIGKILL


def test_without_a_stuck_rank_the_one_waited_for_longest_is_named(stand_ins):
    watch, start = stand_ins
    start("data", "compute")  # rank 0 entered its phase first: the others wait for it
    wait_past_bound()
    assert watch.check()
    assert watch.verdict.startswith("rank 0 ") and "the other ranks were waiting for it" in watch.verdict
    assert "every rank's stacks are in" in watch.verdict
    text = next(watch.log_dir.glob("stacks-*.txt")).read_text()
    assert text.count("in <module>") == 2, text


def test_a_rank_within_its_bound_holds_the_watch_off(stand_ins):
    """Rank 0 still evaluates (parallel.init_timeout_s applies); rank 1, waiting for it, is late."""
    watch, start = stand_ins
    ranks = start("eval", "compute")
    wait_past_bound()
    assert not watch.check() and watch.verdict is None
    assert all(proc.poll() is None for proc in ranks)
