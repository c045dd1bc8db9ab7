"""The launcher's watch over the ranks of its node: a rank that stops making progress ends the run
within its bound, named, with every rank's Python stack in a file.

Each rank writes a heartbeat into a node-local folder (trainer/runtime/faults.py): its step, its phase,
when it last made progress and the bound that applies (`parallel.step_timeout_s` for steps after
its first, `parallel.init_timeout_s` for start-up, the first step, evaluations and checkpoints),
from a thread of its own every second. Once the rank that has gone longest without progress has
exceeded its bound, the run is hung. The watch then

- names the rank that is most likely the cause: a process the kernel has stopped (SIGSTOP, a
  debugger; it cannot write its own stack), one in uninterruptible sleep (a dead mount), one
  whose heartbeat thread no longer runs (stuck in C code with the interpreter locked), else the
  one that has gone longest without progress (the others wait for it in a collective);
- has every other rank write the stacks of all its threads (faulthandler, on STACK_SIGNAL), and
  gathers them into `<run>/logs/stacks-<host>-<time>.txt`;
- kills every rank (SIGKILL to its process group: a hung collective does not end otherwise) and
  leaves its verdict to the launcher, which says it in one line, as the end of the run or as the
  cause of a restart (launch/elastic.py). Nothing is saved: the last complete checkpoint stays as
  it was, and the watch goes on watching the ranks of a restarted attempt.

A rank not yet heard from (starting Python, importing torch) is held to parallel.init_timeout_s
from the moment the watch first saw its process. On several nodes each launcher watches its own
ranks; the node whose rank hung names it, the others name their longest-waiting rank.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.runtime.faults import LOG_DIR_ENV, STACK_SIGNAL, WATCH_DIR_ENV

POLL_S = 1.0
FROZEN_AFTER_S = 10.0  # a heartbeat thread this late is not running (the process is stuck)
STACK_WAIT_S = 5.0  # how long the ranks get to write their stacks


def stuck(info: "RankState") -> bool:
    """The process cannot be making progress: stopped, in uninterruptible sleep, or even its
    heartbeat thread no longer runs (its last heartbeat, phase and bound included, is stale)."""
    return info.state in ("T", "t", "D") or (info.beat_age_s is not None and info.beat_age_s > FROZEN_AFTER_S)


@dataclass
class RankState:
    pid: int
    rank: int | None
    state: str  # the kernel's: R running, S sleeping, D uninterruptible, T/t stopped, Z exited
    step: int | None = None
    phase: str = "start"
    idle_s: float = 0.0  # since the rank last made progress
    bound_s: float = 0.0
    bound_key: str = "parallel.init_timeout_s"
    beat_age_s: float | None = None  # since its heartbeat thread last wrote; None: not heard from yet


def proc_state(pid: int) -> str:
    """The kernel's state letter of process `pid` ('' when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2]


def rank_of(pid: int) -> int | None:
    """The RANK the elastic agent gave process `pid`."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def agent_ranks(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the ranks that the elastic agent in process `agent_pid` started (its children)."""
    found = {}
    for task in Path(f"/proc/{agent_pid}/task").glob("*"):
        try:
            children = [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            continue
        for pid in children:
            rank = rank_of(pid)
            if rank is not None:
                found[rank] = pid
    return found


def _node_local_dir() -> str:
    """Heartbeats change every second: keep them off the (possibly shared) run folder."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return "/tmp" if os.access("/tmp", os.W_OK) else tempfile.gettempdir()


def sweep_stale(parent: Path, min_age_s: float = 600) -> None:
    """Remove the folders of watches whose launcher was killed (SIGKILL leaves them behind):
    old, and none of their ranks alive."""
    for folder in parent.glob("finetrain-watch-*"):
        try:
            if time.time() - folder.stat().st_mtime < min_age_s:
                continue
            pids = [json.loads(beat.read_text()).get("pid") for beat in folder.glob("rank-*.json")]
        except (OSError, ValueError):
            continue
        if not any(proc_state(pid) not in ("", "Z", "X") for pid in pids if isinstance(pid, int)):
            shutil.rmtree(folder, ignore_errors=True)


class RankWatch:
    """Watches the ranks that `pids()` lists (the elastic agent's children) from a thread."""

    def __init__(self, run_dir: Path, init_timeout_s: float, pids):
        parent = _node_local_dir()
        sweep_stale(Path(parent))
        self.directory = Path(tempfile.mkdtemp(prefix="finetrain-watch-", dir=parent))
        self.log_dir = Path(run_dir) / "logs"
        self.init_timeout_s = init_timeout_s
        self.pids = pids
        self.verdict: str | None = None  # why the watch ended a hung attempt (until the launcher takes it)
        self.verdict_rank: int | None = None
        self.first_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finetrain-watch", daemon=True)

    def environment(self) -> dict[str, str]:
        """What the ranks need to know: where to beat and where to log."""
        return {WATCH_DIR_ENV: str(self.directory), LOG_DIR_ENV: str(self.log_dir.resolve())}

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STACK_WAIT_S + 10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.check()  # after a hang the watch goes on: a restarted attempt is watched too
            except Exception as err:  # the watch must never take the run down with it
                print(f"finetrain: the launcher's watch failed ({err!r}); ranks are no longer watched",
                      file=sys.stderr, flush=True)
                return

    # ----------------------------------------------------------------- detection
    def ranks(self) -> list[RankState]:
        now = time.monotonic()
        found = []
        for pid in self.pids():
            state = proc_state(pid)
            if state in ("", "Z", "X"):
                continue
            self.first_seen.setdefault(pid, now)
            rank = rank_of(pid)
            info = RankState(pid, rank, state, idle_s=now - self.first_seen[pid], bound_s=self.init_timeout_s)
            beat = self._read_beat(rank)
            if beat is not None and beat.get("pid") == pid:
                if beat.get("exit_code") is not None:
                    continue  # on its way out, on purpose
                info.step, info.phase = beat["step"], beat["phase"]
                info.idle_s = now - beat["progress_at"]
                info.bound_s, info.bound_key = beat["bound_s"], beat["bound_key"]
                info.beat_age_s = now - beat["beat_at"]
            found.append(info)
        return found

    def _read_beat(self, rank: int | None) -> dict | None:
        if rank is None:
            return None
        try:
            return json.loads((self.directory / f"rank-{rank}.json").read_text())
        except (OSError, ValueError):
            return None

    def check(self) -> bool:
        """End the run if it is hung; True when it did."""
        ranks = self.ranks()
        late = [info for info in ranks if info.idle_s > info.bound_s]
        if not late or not all(info in late or stuck(info) for info in ranks):
            return False  # a rank still within its bound may be what the late ones wait for
        self.end_hung(ranks, max(late, key=lambda info: (not stuck(info), info.idle_s)))
        return True

    # ----------------------------------------------------------------- ending a hung run
    def end_hung(self, ranks: list[RankState], longest: RankState) -> None:
        """`longest`: the late rank that waited longest while its heartbeat kept running."""
        culprit, why = self.culprit(ranks, longest)
        stacks_file = self.gather_stacks(ranks)
        where = f"step {culprit.step}" if culprit.step else "start-up"
        whose = "the other ranks'" if culprit.state in ("T", "t") else "every rank's"
        # Said by the launcher, as the end of the run or as the cause of its restart.
        self.verdict = (f"rank {culprit.rank} (pid {culprit.pid}) made no progress for {culprit.idle_s:.0f} s in "
                        f"{where} ({culprit.phase}; {longest.bound_key}={longest.bound_s:g}): {why}; "
                        f"{whose} stacks are in {stacks_file}")
        self.verdict_rank = culprit.rank
        for info in ranks:
            try:
                os.killpg(info.pid, signal.SIGKILL)  # each rank leads its own process group
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(info.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @staticmethod
    def culprit(ranks: list[RankState], longest: RankState) -> tuple[RankState, str]:
        for info in ranks:
            if info.state in ("T", "t"):
                return info, "its process is stopped (SIGSTOP, or a debugger) and cannot write its stack"
        for info in ranks:
            if info.state == "D":
                return info, "its process is in uninterruptible sleep (waiting on I/O: a dead mount?)"
        frozen = [info for info in ranks if info.beat_age_s is not None and info.beat_age_s > FROZEN_AFTER_S]
        if frozen:
            return max(frozen, key=lambda r: r.beat_age_s), "its heartbeat thread stopped too (stuck in C code?)"
        return longest, "the other ranks were waiting for it"

    def gather_stacks(self, ranks: list[RankState]) -> Path:
        """Every rank that can writes its stacks; gathered into one file in the run's logs."""
        sizes = {}
        for info in ranks:
            if info.state in ("T", "t") or info.rank is None:
                continue
            stacks = self.directory / f"rank-{info.rank}.stacks"
            sizes[info.rank] = stacks.stat().st_size if stacks.is_file() else 0
            try:
                os.kill(info.pid, STACK_SIGNAL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STACK_WAIT_S
        pending = set(sizes)
        last = dict(sizes)
        while pending and time.monotonic() < deadline:
            time.sleep(0.2)
            for rank in list(pending):
                stacks = self.directory / f"rank-{rank}.stacks"
                size = stacks.stat().st_size if stacks.is_file() else 0
                if size > sizes[rank] and size == last[rank]:  # written and no longer growing
                    pending.discard(rank)
                last[rank] = size
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = self.log_dir / f"stacks-{socket.gethostname()}-{stamp}.txt"
        with open(out, "w") as f:
            for info in sorted(ranks, key=lambda r: (r.rank is None, r.rank or 0)):
                f.write(f"==== rank {info.rank}, pid {info.pid}, state {info.state}, step {info.step}, "
                        f"phase {info.phase}, no progress for {info.idle_s:.1f} s ====\n")
                if info.state in ("T", "t"):
                    f.write("(stopped: a stopped process cannot write its stack)\n\n")
                    continue
                stacks = self.directory / f"rank-{info.rank}.stacks"
                text = ""
                if info.rank in sizes and stacks.is_file():
                    with open(stacks, errors="replace") as source:
                        source.seek(sizes[info.rank])
                        text = source.read()
                f.write(text if text.strip() else "(no stack written within "
                        f"{STACK_WAIT_S:g} s: not started yet, or stuck in the kernel)\n")
                f.write("\n")
        return out
