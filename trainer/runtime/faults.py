"""What a rank does about faults: a heartbeat for the launcher to watch, collective timeouts
that end a hung run on their own, per-rank output, and the verdict on a non-finite step.

Hangs. Start-up (process group, data, model, resume) and the first step may take long; after
that a step should not: collectives time out after `parallel.init_timeout_s` until the first
step of this process has run, then after `parallel.step_timeout_s` (torchtitan lowers its
timeout the same way). Evaluations, checkpoint writes and the end of the run keep the long
bound. The bound applies to every process group of the run on gloo and NCCL, except the one
background checkpoint writes use (`exempt`), whose collectives wait for the slowest disk.
Under `finetrain train` each rank also writes a heartbeat (its step, its phase, when it last
made progress, the bound that applies) into a folder the launcher watches
(launch/rank_watch.py); the launcher notices a rank that stopped making progress, has every rank
write its Python stack (signal `STACK_SIGNAL`, faulthandler), names the rank and ends the
run. There the collectives' own timeout is `LAUNCHER_MARGIN_S` longer, so that the launcher,
which can name the rank and collect the stacks, acts first; under plain torchrun or srun the
collective timeout is what ends the run, with one line from each rank that saw it.

Output. Under `finetrain train --nproc/--nnodes` every rank's stdout and stderr go to
`<run>/logs/rank-N.log`; rank 0's also to the terminal. One-line reports reach the terminal
from any rank (`errors.say`), tracebacks that follow from another rank's failure stay in the
log: the launcher reports the cause.

Non-finite steps. A step whose loss or global gradient norm is NaN or infinite drops its
update on every rank alike (the loss is summed over all ranks and the norm is global before
the strategy decides: every rank sees the same values); `train.on_nonfinite` decides whether
the run then stops (`NonFiniteStep`, exit code 3) or goes on.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import io
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from trainer.runtime.errors import UserError, say, set_console

log = logging.getLogger("finetrain")

EXIT_NONFINITE = 3  # a non-finite loss or gradient norm ended the run; nothing saved after the last good checkpoint
EXIT_HUNG = 4  # a rank stopped making progress, or a collective with the other ranks failed
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written (no space, an I/O error); the earlier ones are intact
# The signal on which a rank writes every thread's Python stack (faulthandler). SIGTERM and SIGUSR1
# stop a run, SIGUSR2 is submitit's preemption signal, SIGINT/SIGHUP/SIGQUIT belong to the elastic
# agent; SIGURG is free everywhere, and ignored by a process that has not registered for it yet.
STACK_SIGNAL = signal.SIGURG
WATCH_DIR_ENV = "FINETRAIN_WATCH_DIR"  # set by the launcher: write the heartbeat and stacks here
LOG_DIR_ENV = "FINETRAIN_LOG_DIR"  # set by the launcher: send this rank's output to LOG_DIR/rank-N.log
LAUNCHER_MARGIN_S = 30  # under the launcher, collectives time out this much after its watch fires
BEAT_INTERVAL_S = 1.0
WRITE_EVERY_S = 0.1  # a change of phase is on file at most this late (written at most this often)
LONG_PHASES = ("setup", "eval", "checkpoint", "finishing")


def rank_from_env() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


# --------------------------------------------------------------------------- heartbeat and timeouts


class Heartbeat:
    """This rank's progress: the phase it is in, since when, and the bound that applies; written
    to `directory/rank-N.json` by a thread every BEAT_INTERVAL_S when the launcher watches."""

    def __init__(self, init_timeout_s: float, step_timeout_s: float, directory: Path | None = None,
                 rank: int = 0):
        self.init_timeout_s, self.step_timeout_s = init_timeout_s, step_timeout_s
        self.directory, self.rank = directory, rank
        self.first_step_done = False
        # (step, phase, progress_at, bound_s, bound_key), replaced whole: the thread reads it without a lock
        self.state = (0, "start", time.monotonic(), init_timeout_s, "parallel.init_timeout_s")
        self.work = (0, "start", 0.0)  # the step and phase the rank last worked on, and its collective timeout
        self.collective_bound_s: float | None = None
        self.exit_code: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Event()  # a change of phase the thread is to write
        self._written_at = 0.0
        self._thread = None
        self._stacks = None
        if directory is not None:
            self._stacks = open(directory / f"rank-{rank}.stacks", "w")
            faulthandler.register(STACK_SIGNAL, file=self._stacks, all_threads=True, chain=False)
            self._thread = threading.Thread(target=self._beat, name="finetrain-heartbeat", daemon=True)
            self._write()
            self._thread.start()
        elif _has_fileno(sys.stderr):  # `kill -URG PID` prints a rank's stacks on its stderr
            faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True, chain=False)

    def bound(self, phase: str) -> tuple[float, str]:
        if phase in LONG_PHASES or not self.first_step_done:
            return self.init_timeout_s, "parallel.init_timeout_s"
        return self.step_timeout_s, "parallel.step_timeout_s"

    def enter(self, phase: str, step: int | None = None) -> None:
        bound, key = self.bound(phase)
        bound_changed = bound != self.state[3]
        self.state = (self.state[0] if step is None else step, phase, time.monotonic(), bound, key)
        self.apply_collective_timeout(bound)
        if phase != "finishing":
            self.work = (self.state[0], phase, self.collective_bound_s or 0.0)
        # On file at once when the bound changes (the launcher never applies a shorter bound than
        # the rank's), else at once or within WRITE_EVERY_S by the thread.
        if self.directory is not None:
            if bound_changed or time.monotonic() - self._written_at > WRITE_EVERY_S:
                self._write()
            else:
                self._changed.set()

    def touch(self) -> None:
        """Progress within the current phase (a long wait that is known to be alive)."""
        step, phase, _, bound, key = self.state
        self.state = (step, phase, time.monotonic(), bound, key)

    def apply_collective_timeout(self, bound: float) -> None:
        """Every process group of the run times out after `bound` (plus the launcher's margin)."""
        seconds = collective_timeout_s(bound)
        if seconds == self.collective_bound_s:
            return
        if set_collective_timeout(seconds):
            self.collective_bound_s = seconds

    def _write(self) -> None:
        with self._lock:
            self._write_locked()

    def _write_locked(self) -> None:
        self._written_at = time.monotonic()
        step, phase, progress_at, bound, key = self.state
        beat = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "step": step, "phase": phase,
                "progress_at": progress_at, "beat_at": time.monotonic(), "bound_s": bound, "bound_key": key,
                "exit_code": self.exit_code}
        path = self.directory / f"rank-{self.rank}.json"
        aside = path.with_name(f".rank-{self.rank}.json.tmp")
        try:
            aside.write_text(json.dumps(beat))
            os.replace(aside, path)
        except OSError:  # the launcher removed the folder on its way out
            pass

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._changed.wait(BEAT_INTERVAL_S)
            wait = WRITE_EVERY_S - (time.monotonic() - self._written_at)
            if wait > 0 and self._stop.wait(wait):
                break
            self._changed.clear()
            self._write()

    def close(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._write()  # the launcher sees that this rank ended on purpose
        if self._stacks is not None:
            faulthandler.unregister(STACK_SIGNAL)
            self._stacks.close()


_watch: Heartbeat | None = None


def start(parallel_cfg) -> Heartbeat:
    """Start this rank's watch from the config's timeouts (replacing any earlier one)."""
    global _watch
    if _watch is not None:
        _watch.close(0)
    directory = os.environ.get(WATCH_DIR_ENV)
    _watch = Heartbeat(parallel_cfg.init_timeout_s, parallel_cfg.step_timeout_s,
                   Path(directory) if directory else None, rank_from_env())
    return _watch


def finish(exit_code: int) -> None:
    global _watch
    if _watch is not None:
        _watch.close(exit_code)
        _watch = None


def enter(phase: str, step: int | None = None) -> None:
    """This rank now works on `phase` of `step` (the bound that applies follows from the phase)."""
    if _watch is not None:
        _watch.enter(phase, step)


def touch() -> None:
    if _watch is not None:
        _watch.touch()


_steps_done = 0


def step_done(step: int) -> None:
    """A step finished: from the first one on, steps run under parallel.step_timeout_s."""
    global _steps_done
    _steps_done = step
    if _watch is not None:
        _watch.first_step_done = True
        _watch.enter("end of step", step)


def steps_done() -> int:
    """The optimizer steps this process has finished (the run's step count)."""
    return _steps_done


@contextlib.contextmanager
def long_phase(phase: str, step: int | None = None):
    """A phase that may take long (evaluation, checkpoint), then back to the phase before."""
    if _watch is None:
        yield
        return
    before = _watch.state
    _watch.enter(phase, step)
    try:
        yield
    finally:
        _watch.enter(before[1], before[0])


def current_work() -> tuple[int, str, float]:
    """(step, phase) this rank last worked on, and the collective timeout in seconds."""
    if _watch is None:
        return 0, "start", 0.0
    return _watch.work


def collective_timeout_s(bound: float) -> float:
    return bound + (LAUNCHER_MARGIN_S if os.environ.get(WATCH_DIR_ENV) else 0)


_exempt: set[int] = set()


def exempt(group) -> None:
    """Leave `group`'s timeout alone (the background checkpoint writer's: it waits for disks)."""
    _exempt.add(id(group))


def set_collective_timeout(seconds: float) -> bool:
    """Set the timeout of every process group of this process but the exempt ones; False when
    there is no process group yet."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return False
    timeout = datetime.timedelta(seconds=seconds)
    groups = list(getattr(getattr(c10d, "_world", None), "pg_map", {}) or [c10d._get_default_group()])
    for group in groups:
        if id(group) in _exempt:
            continue
        try:
            c10d._set_pg_timeout(timeout, group)
        except (ValueError, RuntimeError, AssertionError):  # a group this rank is not part of
            continue
    return True


# --------------------------------------------------------------------------- failed collectives

_TIMEOUT_MARKS = ("Timed out waiting", "timed out", "Watchdog caught collective operation timeout")
_LOST_MARKS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
               "/gloo/", "NCCL communicator was aborted", "ncclRemoteError", "ncclSystemError")


def collective_failure(err: BaseException) -> str | None:
    """'timeout' when `err` (or an error it came from) is a collective that timed out, 'lost' when
    one lost its connection to another rank; None for anything else (a bug keeps its traceback)."""
    import torch.distributed as dist

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        distributed = isinstance(err, dist.DistError) or any(mark in text for mark in _LOST_MARKS)
        if any(mark in text for mark in _TIMEOUT_MARKS) and (distributed or "gloo" in text or "NCCL" in text):
            return "timeout"
        if distributed:
            return "lost"
        err = err.__cause__ or err.__context__
    return None


def collective_failure_line(kind: str) -> str:
    """One line for a collective that timed out ('timeout') or lost another rank ('lost')."""
    rank = rank_from_env()
    step, phase, bound = current_work()
    if kind == "timeout":
        what = (f"a collective with the other ranks timed out after {bound:.0f} s in step {step} ({phase}): "
                "another rank hung or died (its stack: kill -URG PID)")
    else:
        what = f"lost the connection to another rank in step {step} ({phase}): another rank died or hung"
    return f"rank {rank}: {what}; nothing was saved since the last checkpoint"


def report_collective_failure(err: BaseException, kind: str, quiet: bool = False) -> int:
    """One line for a collective that timed out or lost another rank; the traceback goes to this
    rank's log. Under the launcher, which names the rank that caused it, the line stays in the log
    too; so it does when the run is about to be restarted (`quiet`: the restart is the one line).
    Returns the exit code."""
    line = collective_failure_line(kind)
    log_stream = _log if _log is not None else sys.stderr
    if _log is not None or os.environ.get("FINETRAIN_TRACEBACK") == "1":
        traceback.print_exception(err, file=log_stream)
    if os.environ.get(WATCH_DIR_ENV):
        print(f"finetrain: {line}", file=log_stream, flush=True)
    elif not quiet:  # (quiet without a log of its own: the restart's line says it)
        say(line)
    return EXIT_HUNG


# --------------------------------------------------------------------------- output


class _Tee(io.TextIOBase):
    """Rank 0's stdout or stderr: the terminal (live, progress bar included) and its log file."""

    def __init__(self, console, log_file):
        self.console, self.log = console, log_file

    def write(self, text: str) -> int:
        self.console.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def fileno(self) -> int:
        return self.console.fileno()

    def isatty(self) -> bool:
        return self.console.isatty()

    @property
    def encoding(self):
        return self.console.encoding

    @property
    def errors(self):
        return self.console.errors

    def __getattr__(self, name: str):  # buffer, name, mode, ...: the terminal's
        return getattr(self.console, name)


_log = None  # this rank's log file, where tracebacks of consequential failures go


def redirect_output() -> Path | None:
    """Under the launcher: this rank's stdout and stderr into `<logs>/rank-N.log` (appended), rank 0's
    also on the terminal (Python-level output; C-level output of rank 0 reaches the terminal only).
    Returns the log file."""
    global _log
    directory = os.environ.get(LOG_DIR_ENV)
    if not directory or _log is not None:
        return None
    rank = rank_from_env()
    path = Path(directory) / f"rank-{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    _log = open(path, "a", buffering=1)
    _log.write(f"==== {datetime.datetime.now().isoformat(timespec='seconds')} rank {rank} on "
               f"{socket.gethostname()}, pid {os.getpid()} ====\n")
    if rank == 0:
        sys.stdout = _Tee(sys.stdout, _log)
        sys.stderr = _Tee(sys.stderr, _log)
        return path
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1)
    for fd in (1, 2):
        os.dup2(_log.fileno(), fd)
    sys.stdout.reconfigure(line_buffering=True)
    set_console(console)
    return path


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


# --------------------------------------------------------------------------- non-finite steps


class NonFiniteStep(UserError):
    """The run stops on a non-finite loss or gradient norm: reported in one line, exit code 3."""

    exit_code = EXIT_NONFINITE
    agreed = True  # every rank raises it at the same step (the values are global): rank 0 reports it


def nonfinite_stop(cfg, step: int, result: dict, skipped_in_a_row: int) -> str | None:
    """After a step whose update was dropped: why the run must stop (the same on every rank: the
    values are global), or None when it goes on (train.on_nonfinite=skip)."""
    what = f"step {step}: loss {result['loss']:.4g}, gradient norm {result['grad_norm']:.4g}"
    if cfg.train.on_nonfinite == "stop":
        return f"{what} (train.on_nonfinite=stop): stopped, nothing saved"
    if skipped_in_a_row >= cfg.train.max_skipped_steps:
        return (f"{what}: {skipped_in_a_row} steps in a row had their update skipped "
                f"(train.max_skipped_steps={cfg.train.max_skipped_steps}): stopped, nothing saved")
    log.warning("%s: its update was skipped (%d in a row; train.on_nonfinite=skip)", what, skipped_in_a_row)
    return None


def last_good(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "no checkpoint was written before it; lower optim.lr or set optim.max_grad_norm"
    return (f"the last good checkpoint is {checkpoint} (checkpoint.resume=auto continues from it); "
            "lower optim.lr or set optim.max_grad_norm")
