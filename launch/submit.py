"""`finetrain submit`: the training job on Slurm, through submitit.

One Slurm task per rank: `--gpus-per-node G` starts G tasks per node, one per GPU, each
running the trainer directly (trainer/runtime/distributed.py reads SLURM_PROCID/SLURM_NTASKS and
finds the master node). Without GPUs (`--gpus-per-node 0`) the job asks for no GPU and
starts `--tasks-per-node` CPU ranks (default 1).

Time limit and preemption: Slurm sends submitit's signal (USR2) `slurm.signal_delay_s`
before the limit. Every rank turns it into the trainer's stop request, so the current
step finishes and a checkpoint is written on all ranks; then rank 0 hands over to
submitit, which pickles `SlurmTraining.checkpoint()` and requeues the job. The requeued
job runs the same command and `checkpoint.resume=auto` continues from that checkpoint.
`scancel --signal=USR1 JOB` stops and requeues the same way. A plain `scancel JOB`
(SIGTERM) also finishes the step and saves, but the job stays cancelled; a preemption
that Slurm requeues by itself resumes from that save. submitit caps the requeues at
`slurm.max_requeues`; it counts every stop after 80 % of the time limit (for limits
under 50 minutes: every stop) as a time-out.

No finetrain launcher watches these ranks: a hung rank ends the run through the collective
timeout (`parallel.step_timeout_s` after the first step), one line from each rank that waited
(trainer/runtime/faults.py); `slurm/train.sbatch` runs `finetrain train --nproc`, whose launcher also
names the hung rank and writes every rank's stack.

Restarts: when a rank dies or hangs, or a checkpoint cannot be written, a surviving rank requeues
the job (`scontrol requeue`), up to `slurm.max_restarts` times per job, and the requeued job resumes
from the newest checkpoint that passes its checksums; its rank 0 reports the restart (one line, a
`restart` record in metrics.jsonl; trainer/runtime/restarts.py). A user's mistake (exit code 2) and
a diverged run (3) are never requeued. `slurm/train.sbatch` restarts within the job instead, through
`finetrain train`'s elastic agent.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config.schema import Config, load_config
from trainer.rank import run_rank
from trainer.runtime import restarts
from trainer.runtime.errors import UserError, report_user_error
from trainer.runtime.faults import EXIT_HUNG, EXIT_SAVE_FAILED

if TYPE_CHECKING:
    import submitit

log = logging.getLogger("finetrain")

# What the surviving ranks of a failed attempt exit with (another rank died or hung; a failed save):
# restarted by a requeue of the job, up to slurm.max_restarts times.
RESTARTED = (EXIT_HUNG, EXIT_SAVE_FAILED)


class SlurmTraining:
    """The callable submitit runs on every task: one rank of the training run.

    submitit's checkpointing protocol: on its preemption/timeout signal it calls
    `checkpoint()` and requeues the DelayedSubmission returned. Progress itself lives in
    the run's checkpoints, so the resubmission is this same callable."""

    def __init__(self, config: str, overrides: list[str]):
        self.config = config
        self.overrides = list(overrides)

    def __call__(self) -> int:
        """Train; returns the last step reached. Requeues when stopped before the end."""
        from submitit import JobEnvironment

        preempt_signal = getattr(signal, "SIG" + JobEnvironment.USR_SIG)
        requeue = signal.getsignal(preempt_signal)  # submitit's checkpoint-and-requeue handler
        signal.signal(preempt_signal, lambda signum, frame: _stop_or_requeue(requeue, signum, frame))
        try:
            cfg = load_config(self.config, self.overrides)
            os.environ[restarts.REQUEUE_ENV] = str(cfg.slurm.max_restarts)
        except UserError:
            cfg = None  # the rank reports it
        outcome = run_rank(self.config, self.overrides)
        if outcome.exit_code in RESTARTED and cfg is not None and restarts.claim_requeue(cfg.output_dir):
            # A rank died or hung, or a save failed: the job starts again and resumes from the newest
            # checkpoint (the ranks of the next attempt report the restart).
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
            return outcome.step
        if outcome.exit_code:
            sys.exit(outcome.exit_code)
        if outcome.unfinished and job_state() == "RUNNING":
            log.warning("stopped at step %d of %d: requeueing to resume", outcome.step, outcome.total_steps)
            signal.signal(preempt_signal, requeue)
            signal.raise_signal(preempt_signal)  # rank 0 requeues and exits; other ranks just return
        return outcome.step

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SlurmTraining(self.config, self.overrides))


def _stop_or_requeue(requeue, signum, frame) -> None:
    """While the loop runs, the preemption signal becomes its stop request (finish the step,
    save on every rank); before that, or on a second signal, there is nothing to save and
    submitit requeues at once."""
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.loop import StopSignal

    stop_handler = signal.getsignal(signal.SIGUSR1)
    if isinstance(getattr(stop_handler, "__self__", None), StopSignal):
        os.kill(os.getpid(), signal.SIGUSR1)
    elif callable(requeue):
        requeue(signum, frame)


def job_state() -> str:
    """Slurm's state of this job. A stop on a job that is still RUNNING came from the
    time-limit signal or a user's USR1 and is requeued here; a job being cancelled, or
    preempted (Slurm requeues those itself), is left to Slurm."""
    out = subprocess.run(["scontrol", "show", "job", "-o", os.environ["SLURM_JOB_ID"]],
                         capture_output=True, text=True, check=True).stdout
    return next(item.split("=", 1)[1] for item in out.split() if item.startswith("JobState="))


def tasks_per_node(gpus_per_node: int, requested: int | None) -> int:
    """One rank per GPU; CPU jobs take `--tasks-per-node` ranks (default 1)."""
    if gpus_per_node > 0:
        if requested not in (None, gpus_per_node):
            raise UserError(f"--tasks-per-node {requested}: GPU jobs run one task per GPU "
                             f"(--gpus-per-node {gpus_per_node})")
        return gpus_per_node
    return requested or 1


SLURM_FLAGS = {"partition": "partition", "account": "account", "qos": "qos", "time": "time_min",
               "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb", "max_requeues": "max_requeues",
               "signal_delay": "signal_delay_s"}


def slurm_overrides(args) -> list[str]:
    """Command-line flags as `slurm.*` overrides: they win over the config, are validated
    with it, and are recorded in the run's config.yaml."""
    return [f"slurm.{key}={getattr(args, flag)}" for flag, key in SLURM_FLAGS.items()
            if getattr(args, flag) is not None]


def executor_parameters(cfg: Config, args) -> dict:
    """submitit's parameters for this job (names as submitit's AutoExecutor takes them)."""
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.tasks_per_node or 1) < 1:
        raise UserError("--nodes and --tasks-per-node must be >= 1, --gpus-per-node >= 0")
    slurm = cfg.slurm
    params = {
        "name": args.job_name or cfg.run.name,
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node(args.gpus_per_node, args.tasks_per_node),
        "cpus_per_task": slurm.cpus_per_task,
        "timeout_min": slurm.time_min,
        "slurm_signal_delay_s": slurm.signal_delay_s,
        "slurm_additional_parameters": {"requeue": True},
    }
    if args.gpus_per_node > 0:
        params["gpus_per_node"] = args.gpus_per_node
    if slurm.mem_gb > 0:
        params["mem_gb"] = slurm.mem_gb
    for key in ("partition", "account", "qos"):
        if getattr(slurm, key):
            params[f"slurm_{key}"] = getattr(slurm, key)
    return params


# submitit configures logging as it is imported, unless this variable says NOCONFIG.
SUBMITIT_LOG_ENV = "SUBMITIT_LOG_LEVEL"


def import_submitit():
    """submitit, imported without the logging set-up it does on import: its
    logging.config.dictConfig closes every handler the process already has (finetrain's, and those
    of libraries imported before it, which may close the stream they write to). Its records reach
    finetrain's handlers instead. A variable the user set is left as it is; the job itself imports
    submitit with the environment as it was (the variable is put back before submitting)."""
    set_by_user = SUBMITIT_LOG_ENV in os.environ
    os.environ.setdefault(SUBMITIT_LOG_ENV, "NOCONFIG")
    try:
        import submitit
    finally:
        if not set_by_user:
            del os.environ[SUBMITIT_LOG_ENV]
    return submitit


def submit(args) -> "submitit.Job":
    """Validate the config, then submit; raises a UserError before anything reaches Slurm."""
    submitit = import_submitit()
    config = str(Path(args.config).resolve())
    overrides = [*args.overrides, *slurm_overrides(args)]
    cfg = load_config(config, overrides)
    params = executor_parameters(cfg, args)  # UserError on a bad task layout
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.plan import plan_run

    plan_run(cfg, args.nodes * params["tasks_per_node"], "cuda" if args.gpus_per_node > 0 else "cpu")
    folder = Path(cfg.run.output_dir).resolve() / "slurm"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**params)
    return executor.submit(SlurmTraining(config, overrides))


def cmd_submit(args) -> int:

    try:
        job = submit(args)
    except UserError as err:
        return report_user_error(err, args.config, [*args.overrides, *slurm_overrides(args)])
    print(f"submitted job {job.job_id}; logs in {job.paths.folder}")
    return 0


def add_submit_parser(sub) -> None:
    """The `submit` subcommand, added to the `finetrain` parser's subparsers."""
    p = sub.add_parser("submit", help="submit the training run to Slurm (submitit); requeues on time limit or preemption")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="one rank per GPU; 0 for a CPU job")
    p.add_argument("--tasks-per-node", type=int, default=None, help="CPU ranks per node when --gpus-per-node 0 (default 1)")
    p.add_argument("--partition", help="overrides slurm.partition")
    p.add_argument("--account", help="overrides slurm.account")
    p.add_argument("--qos", help="overrides slurm.qos")
    p.add_argument("--time", type=int, help="time limit in minutes; overrides slurm.time_min")
    p.add_argument("--cpus-per-task", type=int, help="overrides slurm.cpus_per_task")
    p.add_argument("--mem-gb", type=int, help="memory per node; overrides slurm.mem_gb")
    p.add_argument("--max-requeues", type=int, help="time-limit requeues; overrides slurm.max_requeues")
    p.add_argument("--signal-delay", type=int, help="seconds of warning before the time limit; overrides slurm.signal_delay_s")
    p.add_argument("--job-name", help="default: run.name")
    p.set_defaults(run=cmd_submit)
