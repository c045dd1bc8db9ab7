"""Restarts of a run's worker group: what an attempt that ends leaves for the next one, and what
the next one makes of it.

torch's elastic agent restarts the worker group after a failure (`finetrain train --max-restarts
N`, `torchrun --max-restarts N`, slurm.max_restarts); the new attempt resumes from the newest
checkpoint that passes its checksums. The attempts of a run share its folder, and there the
journal `logs/restarts.jsonl` (one JSON object a line, appended) holds

- how a rank ended, when it ended with a non-zero code under its own control: `{"end": code,
  "rank", "line", "step"}` (`line`: the one line it reported; `step`: the steps it had done);
  finetrain's launcher adds the same for the ranks it saw die by a signal or end hung;
- each restart, written by rank 0 of the attempt that resumed: `{"restart": n, "rank", "cause",
  "resumed_from", "steps_recomputed"}`,

each with the wall time it was written (`at`). From it a restarted attempt learns why the one
before it ended: a user's mistake (exit code 2) or a diverged run (3) is never run again, whoever
restarted it (the ranks of the new attempt end at once with the same line and code; finetrain's
launcher does not even restart them); otherwise the restart is reported with its cause, the rank
and the step it resumed from, and the run summary counts the restarts and the steps recomputed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

JOURNAL = Path("logs") / "restarts.jsonl"  # in run.output_dir
# Exit codes that end a run for good: a user's mistake, a non-finite loss or gradient norm.
NEVER_RESTARTED = (2, 3)
# Set by torch's elastic agent on every rank: which restart this is, and how many are allowed.
_RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
_MAX_RESTARTS_ENV = "TORCHELASTIC_MAX_RESTARTS"
# Set by finetrain submit's task on every rank: restarts by requeueing the Slurm job, at most this many.
REQUEUE_ENV = "FINETRAIN_REQUEUE_RESTARTS"


def restart_number() -> int:
    """Which restart of the worker group this process belongs to under torch's elastic agent
    (0: the first attempt, or no agent)."""
    return _env_int(_RESTART_COUNT_ENV)


def max_restarts() -> int:
    return _env_int(_MAX_RESTARTS_ENV)


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def enabled() -> bool:
    """Whether a failure of this run may be restarted (then its ranks keep the journal)."""
    return _env_int(_MAX_RESTARTS_ENV) > 0 or _env_int(REQUEUE_ENV) > 0


def this_restart(entries: list[dict]) -> tuple[int, int]:
    """(which restart this attempt is, how many are allowed): under torch's elastic agent its own
    counts; under finetrain submit the requeues of this Slurm job for a restart."""
    if _env_int(REQUEUE_ENV) > 0 and restart_number() == 0:
        return _requeues(entries), _env_int(REQUEUE_ENV)
    return restart_number(), max_restarts()


def pending(run_dir: Path | None = None) -> bool:
    """Whether a failure of this attempt (other than a user's mistake or divergence) is followed by a
    restart: then the restart is what gets reported, in one line."""
    done, allowed = this_restart(read(run_dir) if run_dir is not None and _env_int(REQUEUE_ENV) else [])
    return allowed > done


def is_restart(run_dir: Path) -> bool:
    """Whether this attempt follows a failed one of the same launch: a restart of the elastic agent's,
    or a Slurm job requeued for a restart (finetrain submit) that has not yet been reported."""
    if restart_number() > 0:
        return True
    return any("requeue" in entry for entry in since_last_restart(read(run_dir)))


def _requeues(entries: list[dict]) -> int:
    job = os.environ.get("SLURM_JOB_ID")
    return sum(1 for entry in entries if "requeue" in entry and entry.get("job") == job)


def claim_requeue(run_dir: Path) -> bool:
    """finetrain submit, a rank whose attempt failed: whether it is the one to requeue the Slurm job for
    a restart (restarts left, and no other rank of the attempt has claimed it); journals it then."""
    entries = read(run_dir)
    count = _requeues(entries)
    if count >= _env_int(REQUEUE_ENV):
        return False
    claim = Path(run_dir) / JOURNAL.parent / f"requeue-{os.environ.get('SLURM_JOB_ID')}-{count + 1}"
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    append(run_dir, {"requeue": count + 1, "job": os.environ.get("SLURM_JOB_ID")})
    return True


def append(run_dir: Path, entry: dict) -> None:
    """Add one entry to the run's journal (a single short write in append mode: whole lines, even
    when several ranks end at once)."""
    path = Path(run_dir) / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"at": time.time(), **entry}) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def record_end(run_dir: Path, rank: int | None, code: int, line: str, step: int | None = None,
               by: str = "rank") -> None:
    append(run_dir, {"end": code, "rank": rank, "line": line, "step": step, "by": by,
                     "host": socket.gethostname()})


def read(run_dir: Path) -> list[dict]:
    """The journal's entries in order (a line cut short by a kill is left out)."""
    path = Path(run_dir) / JOURNAL
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("at"), (int, float)):
            entries.append(entry)
    return entries


def agent_started_at() -> float | None:
    """Wall time at which this process's parent (the elastic agent that started this rank) started;
    None where /proc does not say."""
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + started_ticks / os.sysconf("SC_CLK_TCK")


def final_end(run_dir: Path) -> dict | None:
    """In a restarted attempt: the end of an earlier attempt of this launch that must not run
    again (a user's mistake, a diverged run), or None. Entries written before the agent started
    belong to earlier launches of the run (a fixed config, a requeued job) and do not count."""
    if restart_number() == 0:
        return None
    since = agent_started_at()
    if since is None:
        return None
    # The clock-tick start time is rounded down to 1/CLK_TCK s: a second of slack either way is safe,
    # since an earlier launch ended before this one's agent was started.
    for entry in reversed(read(run_dir)):
        if entry["at"] < since - 1:
            break
        if entry.get("end") in NEVER_RESTARTED and isinstance(entry.get("line"), str):
            return entry
    return None


def since_last_restart(entries: list[dict]) -> list[dict]:
    """The entries after the newest restart entry: the ends of the attempt that failed last."""
    for index in range(len(entries) - 1, -1, -1):
        if "restart" in entries[index]:
            return entries[index + 1:]
    return entries


def _how_telling(entry: dict) -> tuple[int, bool]:
    """Which end says most about why an attempt failed: the launcher's view of a rank (a signal, a
    hang) or a rank's crash first, then a failed save, last a rank that only lost contact with
    another or was ended by the agent; among equals rank 0's, which reports what all ranks agreed."""
    code = entry.get("end")
    if entry.get("by") == "launcher" or code == 1:
        tell = 2
    elif code in (4, -15):
        tell = 0
    else:
        tell = 1
    return tell, entry.get("rank") == 0


def failure_cause(entries: list[dict], world_size: int, steps_done_here: int = 0) -> dict:
    """{cause, rank, steps_done} of the attempt that failed last, from the journal's entries
    since the last restart. Under plain torchrun a rank that was killed or stopped leaves no entry:
    when every other rank ended losing contact, the one that left none is named."""
    ends = [e for e in since_last_restart(entries) if "end" in e]
    steps = max([e["step"] for e in ends if isinstance(e.get("step"), int)] + [steps_done_here])
    if not ends:
        return {"cause": "the worker group failed (its ranks left no report: killed by a signal?)", "rank": None,
                "steps_done": steps}
    best = max(ends, key=_how_telling)
    if _how_telling(best)[0] == 0:
        reported = {e.get("rank") for e in ends}
        silent = [rank for rank in range(world_size) if rank not in reported]
        if len(silent) == 1:
            return {"cause": f"rank {silent[0]} ended without a report (killed by a signal, or stopped and then "
                             "ended by the agent); the others lost contact with it",
                    "rank": silent[0], "steps_done": steps}
    return {"cause": best["line"], "rank": best.get("rank"), "steps_done": steps}


def restart_totals(entries: list[dict]) -> tuple[int, int]:
    """(restarts, steps recomputed) over the whole run."""
    restarts = [e for e in entries if "restart" in e]
    return len(restarts), sum(int(e.get("steps_recomputed") or 0) for e in restarts)
