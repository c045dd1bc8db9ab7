"""The ranks of one node under torch's elastic agent (what `torchrun` runs), with finetrain's
exit semantics.

Plain torchrun treats every signal it receives as a failure: it forwards the signal to its
workers, waits for them, then raises, so a run that every rank stopped and checkpointed
cleanly still ends with a traceback and exit code 1; and a user's mistake that every rank
reported ends in the agent's failure summary. Here the same agent runs in this process, but

- SIGTERM and SIGUSR1 are forwarded to the ranks (each runs in a session of its own) and
  the agent goes on watching them: once every rank has checkpointed and exited 0, so does
  this process. A second signal (after the ranks' repeat window) kills the ranks at once.
- A run whose ranks exited with code 2 (a user's mistake) or 3 (a non-finite loss or gradient
  norm), already reported in one line by rank 0, exits with that code without more (ranks the
  agent ended on their way out, and ranks that lost contact with them, count with them).
- A rank that crashed or was killed is named in one line per rank (its signal, "out of memory?"
  when the kernel's OOM killer ended a process meanwhile, or its exit code and error), and the
  exit code is 1. The ranks that then lost contact with it (exit code 4) are not causes: their
  tracebacks stay in their logs.
- Every rank's stdout and stderr go to `<run>/logs/rank-N.log`; the terminal gets rank 0's
  output and finetrain's one-line reports from any rank (trainer/runtime/faults.py).
- A rank that stops making progress ends the run within its bound, named, with every rank's
  stack in `<run>/logs/` (launch/rank_watch.py); exit code 4.
- SIGINT, SIGHUP and SIGQUIT stay with the agent: it passes them on and ends the ranks.
- With `--max-restarts N` a failed attempt (a rank that died or was killed, a hang, a checkpoint
  that could not be written) is restarted up to N times, in one line each, and resumes from the
  newest checkpoint that passes its checksums; a user's mistake (2) and a diverged run (3) are
  never restarted. The agent's rendezvous stays open meanwhile: on several nodes, the agents of
  the other nodes restart their ranks too and every node rejoins (c10d).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

from launch.rank_watch import RankWatch
from trainer.runtime.faults import EXIT_HUNG, EXIT_NONFINITE, EXIT_SAVE_FAILED
from trainer.runtime.restarts import NEVER_RESTARTED, record_end, since_last_restart
from trainer.runtime.restarts import read as read_journal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
SHUTDOWN_TIMEOUT_S = 300  # a rank asked to stop finishes its step and saves within this


def child_pids() -> list[int]:
    """This process's children: the ranks the agent started (Linux)."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def forward_to_ranks(signum, frame) -> None:
    for pid in child_pids():
        try:
            os.killpg(pid, signum)  # each rank leads its own process group
        except ProcessLookupError:
            pass


def default_rdzv_id(output_dir: str) -> str:
    """Agents of one job must share a rendezvous id: the Slurm job's, or one derived from the
    run's output folder (the same on every node of a run started with the same config)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"finetrain-{os.environ['SLURM_JOB_ID']}"
    return "finetrain-" + hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


def run_ranks(trainer_args: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
              rdzv_id: str | None = None, scratch: Path | None = None, run_dir: Path | None = None,
              init_timeout_s: float = 300, module: str = "trainer", max_restarts: int = 0) -> int:
    """Run `python -m trainer *trainer_args` (or another `module`) as `nproc` ranks on this node
    of `nnodes`; returns the exit code for the command line. With `run_dir`, the ranks log into
    `run_dir/logs` and are watched for hangs (launch/rank_watch.py). A failed attempt is
    restarted up to `max_restarts` times (never after a user's mistake or a diverged run)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import config_from_args, parse_args

    if scratch is not None:  # the agent's and the ranks' temporary files stay in the run folder
        scratch.mkdir(parents=True, exist_ok=True)
        os.environ["TMPDIR"] = tempfile.tempdir = str(scratch.resolve())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # failures are reported below
    single_node = nnodes == 1 and rdzv_endpoint is None
    args = parse_args([
        "--nproc-per-node", str(nproc), "--nnodes", str(nnodes),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0" if single_node else rdzv_endpoint,
        "--rdzv-id", uuid.uuid4().hex if single_node else rdzv_id,
        "--signals-to-handle", AGENT_SIGNALS, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
        "--max-restarts", str(max_restarts), "-m", module, *trainer_args,
    ])
    config, entrypoint, entry_args = config_from_args(args)
    watch = RankWatch(run_dir, init_timeout_s, child_pids) if run_dir is not None else None
    failures = Failures(run_dir, watch, max_restarts)
    saved_env = dict(os.environ)
    if watch is not None:
        os.environ.update(watch.environment())  # the agent passes its environment on to the ranks
        watch.start()
    previous = {sig: signal.signal(sig, forward_to_ranks) for sig in STOP_SIGNALS}
    try:
        result = run_agent(config, entrypoint, entry_args, failures.restartable)
    except SignalException as err:
        name = signal.Signals(err.sigval).name
        print(f"finetrain: stopped by {name}; the ranks were ended without a checkpoint", file=sys.stderr)
        return 128 + int(err.sigval)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if watch is not None:
            watch.stop()
        os.environ.clear()
        os.environ.update(saved_env)
    if not result.is_failed():
        return 0
    code, lines = failures.describe(result.failures)
    for line in lines:
        print(f"finetrain: {line}", file=sys.stderr)
    return code


def run_agent(config, entrypoint: str, entry_args: list[str], restartable):
    """torch's elastic agent for this node (what torchrun's launch_agent builds), whose worker group
    is restarted after a failure only while `restartable(failures)` says so; returns its RunResult."""
    from torch.distributed.elastic.agent.server.api import WorkerSpec, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rendezvous_registry

    class Agent(LocalElasticAgent):
        def _monitor_workers(self, worker_group):
            # The agent restarts a failed group while restarts remain; the one place to say no
            # (torch's own agent has no policy by exit code).
            result = super()._monitor_workers(worker_group)
            if result.state == WorkerState.FAILED and not restartable(result.failures, self._remaining_restarts):
                self._remaining_restarts = 0
            return result

    # The signals the agent takes for itself (the others are finetrain's: forwarded to the ranks)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle
    rendezvous = RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint,
                                      run_id=config.run_id, min_nodes=config.min_nodes,
                                      max_nodes=config.max_nodes, local_addr=config.local_addr,
                                      **config.rdzv_configs)
    spec = WorkerSpec(role=config.role, local_world_size=config.nproc_per_node, entrypoint=entrypoint,
                      args=tuple(entry_args), rdzv_handler=rendezvous_registry.get_rendezvous_handler(rendezvous),
                      max_restarts=config.max_restarts, monitor_interval=config.monitor_interval,
                      local_addr=config.local_addr)
    agent = Agent(spec=spec, logs_specs=config.logs_specs, start_method=config.start_method,
                  log_line_prefix_template=config.log_line_prefix_template,
                  shutdown_timeout=config.shutdown_timeout)
    close_rendezvous = True
    try:
        return agent.run()
    except SignalException:
        close_rendezvous = False  # as torchrun: a signalled agent leaves the rendezvous open for the others
        raise
    finally:
        if close_rendezvous:
            spec.rdzv_handler.shutdown()


class Failures:
    """What the launcher makes of the failed attempts of its ranks: whether to restart (never after a
    user's mistake or a diverged run), the one line that says each restart, the run journal's
    entries for the ranks it saw die or hang (trainer/runtime/restarts.py), and the final report."""

    def __init__(self, run_dir: Path | None, watch: RankWatch | None, max_restarts: int):
        self.run_dir, self.watch, self.max_restarts = run_dir, watch, max_restarts
        self.log_dir = run_dir / "logs" if run_dir is not None else None
        self.oom_before = oom_kills()

    def describe(self, failures: dict) -> tuple[int, list[str]]:
        """(exit code, lines that say why) of a failed attempt; no line where the ranks have said it."""
        if self.watch is not None and self.watch.verdict:
            verdict, self.watch.verdict = self.watch.verdict, None
            return EXIT_HUNG, [verdict + "; the run was ended, nothing saved since the last checkpoint"]
        oom_killed = None if self.oom_before is None else oom_kills() != self.oom_before
        return failure_report(failures, self.log_dir, oom_killed)

    def restartable(self, failures: dict, remaining: int) -> bool:
        """Called by the agent for each failed attempt: False for a user's mistake or a diverged run.
        With a restart to come, says it in one line and journals the ranks that died or hung."""
        code, _ = failure_report(failures)
        if code in NEVER_RESTARTED:
            return False
        if remaining <= 0:  # the agent ends the run: `describe` says why, as without restarts
            return True
        if self.watch is not None and self.watch.verdict:
            cause, self.watch.verdict = self.watch.verdict, None
            if self.run_dir is not None:
                record_end(self.run_dir, self.watch.verdict_rank, EXIT_HUNG, cause, by="launcher")
        else:
            oom_killed = None if self.oom_before is None else oom_kills() != self.oom_before
            _, lines = failure_report(failures, self.log_dir, oom_killed)
            cause = lines[0] if lines else self._reported_by_ranks()
            for rank, failure in sorted(failures.items()):
                if self.run_dir is not None and failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM:
                    record_end(self.run_dir, rank, failure.exitcode, cause_line(rank, failure, self.log_dir, oom_killed),
                               by="launcher")
        attempt = self.max_restarts - remaining + 1
        print(f"finetrain: restart {attempt} of {self.max_restarts}: {cause}; resuming from the newest checkpoint "
              "that passes its checksums", file=sys.stderr, flush=True)
        self.oom_before = oom_kills()
        return True

    def _reported_by_ranks(self) -> str:
        """The line a rank left in the journal when it ended (a failed save, say)."""
        if self.run_dir is not None:
            for entry in reversed(since_last_restart(read_journal(self.run_dir))):
                if entry.get("end") not in (None, EXIT_HUNG, -signal.SIGTERM) and entry.get("line"):
                    return entry["line"]
        return "the ranks failed"


# Exit codes a rank reports itself, in one line from rank 0: a user's mistake, a non-finite step, a
# checkpoint that could not be written.
REPORTED_BY_RANKS = (2, EXIT_NONFINITE, EXIT_SAVE_FAILED)


def failure_report(failures: dict, log_dir: Path | None = None, oom_killed: bool | None = None) -> tuple[int, list[str]]:
    """(exit code, lines): the ranks' code when they stopped on a user's mistake, a non-finite step or a
    failed save (rank 0 has said what it was: no line); otherwise one line for each failed rank that is
    a cause and exit code 1 (or 4 when every failure was a lost contact with another rank, say on
    another node)."""
    failures = dict(sorted(failures.items()))
    # Every rank raises a user's mistake, but the first to exit makes the agent end the others
    # (SIGTERM, then SIGKILL after the shutdown timeout) while they are still on their way out;
    # a rank still in a collective with one that exited loses contact with it (exit code 4).
    ended_by_agent = (-signal.SIGTERM, -signal.SIGKILL)
    codes = [failure.exitcode for failure in failures.values()]
    for reported in REPORTED_BY_RANKS:
        if reported in codes and all(code in (reported, EXIT_HUNG, *ended_by_agent) for code in codes):
            return reported, []
    # After the first failure the agent ends the other ranks (SIGTERM); those, and ranks that lost
    # contact with the failed one, are consequences, whose tracebacks stay in their logs.
    causes = {rank: f for rank, f in failures.items() if f.exitcode not in (EXIT_HUNG, -signal.SIGTERM)} or failures
    lines = [cause_line(rank, failure, log_dir, oom_killed) for rank, failure in causes.items()]
    return (EXIT_HUNG if all(f.exitcode == EXIT_HUNG for f in causes.values()) else 1), lines


def cause_line(rank: int, failure, log_dir: Path | None, oom_killed: bool | None = None) -> str:
    """`rank 1 was killed by SIGKILL (its output is in runs/x/logs/rank-1.log)`."""
    if failure.exitcode < 0:
        what = f"was killed by {failure.signal_name()}"
        if failure.exitcode == -signal.SIGKILL and oom_killed is not False:
            what += (" (out of memory? the kernel's OOM killer ended a process during the run: see dmesg)"
                     if oom_killed else " (out of memory? the kernel's OOM killer sends SIGKILL: see dmesg)")
    elif failure.exitcode == EXIT_HUNG:
        what = "lost contact with the other ranks (exit code 4: a rank elsewhere died or hung)"
    else:
        what = f"exited with code {failure.exitcode}"
        message = _error_message(failure)
        if message:
            what += f": {message}"
    where = f"its output is in {log_dir / f'rank-{rank}.log'}" if log_dir else "see its output above"
    return f"rank {rank} {what} ({where})"


def _error_message(failure) -> str:
    """The last line of the exception a rank raised (from its torchelastic error file)."""
    data = getattr(failure, "error_file_data", None) or {}
    message = data.get("message", "")
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [line for line in str(message).splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


def oom_kills() -> int | None:
    """Processes the kernel's OOM killer has ended: in this process's memory cgroup (v2 or v1),
    else on the machine; None where the kernel does not say."""
    counts = []
    try:
        cgroups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        cgroups = []
    for line in cgroups:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            counts.append(_counter(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events", "oom_kill"))
        elif "memory" in controllers.split(","):
            counts.append(_counter(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control", "oom_kill"))
    counts.append(_counter(Path("/proc/vmstat"), "oom_kill"))
    known = [count for count in counts if count is not None]
    return sum(known) if known else None


def _counter(path: Path, name: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        return None
    return None
