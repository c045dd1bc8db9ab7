"""The journal of a run's restarts (trainer/runtime/restarts.py): what a failed attempt leaves for the
next, read back as the cause of a restart, or as the end of a run that must not run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from helpers import REPO
from trainer.runtime import restarts


def test_the_most_telling_end_of_the_failed_attempt_is_the_cause(tmp_path):
    restarts.record_end(tmp_path, 0, 4, "rank 0: lost the connection to another rank in step 7", step=6)
    restarts.record_end(tmp_path, 1, -9, "rank 1 was killed by SIGKILL", by="launcher")
    cause = restarts.failure_cause(restarts.read(tmp_path), world_size=2)
    assert cause == {"cause": "rank 1 was killed by SIGKILL", "rank": 1, "steps_done": 6}
    restarts.append(tmp_path, {"restart": 1, "step": 4, "steps_recomputed": 2})
    # after a restart only what came since counts; under plain torchrun a killed rank leaves nothing
    restarts.record_end(tmp_path, 1, 4, "rank 1: a collective with the other ranks timed out", step=9)
    cause = restarts.failure_cause(restarts.read(tmp_path), world_size=2)
    assert cause["rank"] == 0 and cause["cause"].startswith("rank 0 ended without a report") and cause["steps_done"] == 9
    restarts.append(tmp_path, {"restart": 2, "step": 8, "steps_recomputed": 1})
    assert restarts.restart_totals(restarts.read(tmp_path)) == (2, 3)
    with open(tmp_path / restarts.JOURNAL, "a") as f:
        f.write('{"at": 1, "end": 2, "li')  # a kill while appending: the line is left out
    assert len(restarts.read(tmp_path)) == 5


AGENT = '''
import os, subprocess, sys, time
time.sleep(1.5)  # this process (the agent) started well before the journal entries below
sys.path.insert(0, {repo!r})
from trainer.runtime import restarts
restarts.record_end({run!r}, 0, 3, "step 2: loss nan (train.on_nonfinite=stop): stopped, nothing saved")
rank = [sys.executable, "-c", "import sys, json; sys.path.insert(0, {repo!r}); from trainer.runtime import restarts; "
        "print(json.dumps(restarts.final_end({run!r})))"]
for count in ("0", "1"):
    print(subprocess.run(rank, env=dict(os.environ, TORCHELASTIC_RESTART_COUNT=count), capture_output=True,
                         text=True).stdout.strip())
'''


def test_a_restarted_attempt_finds_a_mistake_of_its_launch_and_only_of_its_launch(tmp_path):
    """A rank of a restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) ends at once on a user's mistake
    or a divergence that its agent's launch met; an entry from before the agent started (an earlier
    launch, since fixed) and the first attempt of a launch see none."""
    run = tmp_path / "run"
    restarts.record_end(run, 0, 2, "an earlier launch's mistake")
    time.sleep(1.2)
    script = tmp_path / "agent.py"
    script.write_text(AGENT.format(repo=str(REPO), run=str(run)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")})
    first, restarted = out.stdout.splitlines()
    assert json.loads(first) is None
    ended = json.loads(restarted)
    assert ended["end"] == 3 and ended["line"].startswith("step 2: loss nan"), out.stdout + out.stderr
