"""The ranks of one node under torch's elastic agent (what `torchrun` runs), with finetrain's
exit semantics.

Plain torchrun treats every signal it receives as a failure: it forwards the signal to its
workers, waits for them, then raises, so a run that every rank stopped and checkpointed
cleanly still ends with a traceback and exit code 1; and a user's mistake that every rank
reported ends in the agent's failure summary. Here the same agent runs in this process, but

- SIGTERM and SIGUSR1 are forwarded to the ranks (each runs in a session of its own) and
  the agent goes on watching them: once every rank has checkpointed and exited 0, so does
  this process. A second signal (after the ranks' repeat window) kills the ranks at once.
- A run whose ranks exited with code 2 (a user's mistake, already reported in one line by
  rank 0; ranks the agent ended on its way out count with them) exits 2 without more; a rank that crashed or was killed is named in one line per
  rank, and the exit code is 1.
- SIGINT, SIGHUP and SIGQUIT stay with the agent: it passes them on and ends the ranks.
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
              rdzv_id: str | None = None, scratch: Path | None = None, module: str = "trainer") -> int:
    """Run `python -m trainer *trainer_args` (or another `module`) as `nproc` ranks on this node
    of `nnodes`; returns the exit code for the command line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
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
        "-m", module, *trainer_args,
    ])
    config, entrypoint, entry_args = config_from_args(args)
    previous = {sig: signal.signal(sig, forward_to_ranks) for sig in STOP_SIGNALS}
    try:
        elastic_launch(config, entrypoint)(*entry_args)
    except ChildFailedError as err:
        return _report_failures(err)
    except SignalException as err:
        name = signal.Signals(err.sigval).name
        print(f"finetrain: stopped by {name}; the ranks were ended without a checkpoint", file=sys.stderr)
        return 128 + int(err.sigval)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _report_failures(err) -> int:
    """Exit 2 when the ranks stopped on a user's mistake (rank 0 has said what it was);
    otherwise name each failed rank in one line and exit 1."""
    failures = dict(sorted(err.failures.items()))
    # Every rank raises a user's mistake, but the first to exit makes the agent end the others
    # (SIGTERM, then SIGKILL after the shutdown timeout) while they are still on their way out.
    ended_by_agent = (-signal.SIGTERM, -signal.SIGKILL)
    codes = [failure.exitcode for failure in failures.values()]
    if 2 in codes and all(code == 2 or code in ended_by_agent for code in codes):
        return 2
    for rank, failure in failures.items():
        if failure.exitcode < 0:
            what = f"was killed by {failure.signal_name()}"
        else:
            what = f"exited with code {failure.exitcode}"
        print(f"finetrain: rank {rank} {what} (see its output above)", file=sys.stderr)
    return 1
