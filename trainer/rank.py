"""One rank of a run, from a config file to an exit code: what every launcher starts.

`python -m trainer` (under torchrun or srun), the single-process `finetrain train` and
`finetrain submit`'s Slurm task all call `run_rank`, so a rank behaves the same whoever
started it. Exit codes: 0 when the run finished or was stopped by SIGTERM/SIGUSR1 and
checkpointed; 2 for a user's mistake (config, data, files, launch layout), reported as one
line `finetrain: ...` by rank 0 for every rank that agreed on it; 3 when a non-finite loss or
gradient norm stopped the run (nothing saved); 4 when a collective with the other ranks timed
out or lost one of them (another rank hung or died: one line, the traceback in the rank's log); 5
when a checkpoint could not be written; 130 after Ctrl-C. Anything else is a bug of finetrain's and
keeps its traceback. Where restarts are allowed (trainer/runtime/restarts.py) a rank that ends with
an error says so in the run's journal, for the attempt after it; one that finds its attempt is a
restart of a run that ended on a user's mistake or diverged ends at once, as it did.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from trainer.config.schema import load_config
from trainer.config.tree import parse_override
from trainer.runtime import faults, restarts
from trainer.runtime.errors import UserError, first_line, report_user_error, user_error_lines


def setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def debug_overrides(overrides: list[str]) -> list[str]:
    """--debug: a few steps into a separate folder, nothing resumed or uploaded."""
    given = {parse_override(o)[0] for o in overrides}
    extra = ["train.epochs=null", "checkpoint.resume=never", "logging.wandb.mode=disabled"]
    if "train.max_steps" not in given:
        extra.append("train.max_steps=5")
    return list(overrides) + extra


@dataclass(frozen=True)
class RankOutcome:
    exit_code: int
    step: int = 0  # optimizer steps done when the rank ended
    total_steps: int = 0  # 0 when the run never started

    @property
    def unfinished(self) -> bool:
        """Stopped (a signal, a preemption) before its last step: a requeue resumes it."""
        return self.exit_code == 0 and self.step < self.total_steps


class EndedBefore(UserError):
    """A restarted attempt of a run whose earlier attempt ended on a user's mistake or a non-finite
    step: it ends at once, with the same line and exit code (trainer/runtime/restarts.py). Each rank
    says it: the first to exit has the agent end the others, possibly before rank 0 could."""

    def __init__(self, entry: dict):
        super().__init__(entry["line"])
        self.exit_code = entry["end"]


def run_rank(config: str, overrides: list[str] = (), debug: bool = False) -> RankOutcome:
    """Train on this rank; a user's mistake is reported here and becomes exit code 2."""
    faults.redirect_output()  # under finetrain's launcher: into <run>/logs/rank-N.log
    setup_logging()
    # here, not at the top: the output goes to the rank's log before torch and the model code load
    # (and the command line, which imports this module, starts without them)
    from trainer.loop import StopSignal, Trainer
    from trainer.runtime.distributed import shutdown

    # From the start: a stop requested while the run sets up is honoured at its first step.
    stop = StopSignal()
    overrides = list(overrides)
    outcome = RankOutcome(1)  # a bug raises through
    run_dir, lines = None, []
    try:
        overrides = debug_overrides(overrides) if debug else overrides
        cfg = load_config(config, overrides)
        run_dir = cfg.output_dir
        ended = restarts.final_end(run_dir)
        if ended is not None:
            run_dir = None  # already in the journal
            raise EndedBefore(ended)
        trainer = Trainer(cfg, stop, debug=debug)
        trainer.fit()
        outcome = RankOutcome(0, trainer.step, trainer.total_steps)
    except UserError as err:
        lines = user_error_lines(err, config, overrides)
        if err.exit_code in restarts.NEVER_RESTARTED or not restarts.pending(run_dir):
            report_user_error(err, config, overrides)
        outcome = RankOutcome(err.exit_code)
    except KeyboardInterrupt:
        print("finetrain: interrupted (Ctrl-C); nothing saved since the last checkpoint", file=sys.stderr)
        outcome = RankOutcome(130)
    except Exception as err:
        kind = faults.collective_failure(err)  # the consequence of another rank's failure, not a bug here
        if kind is None:
            lines = [f"rank {faults.rank_from_env()} crashed: {type(err).__name__}: {first_line(err)}"]
            raise
        outcome = RankOutcome(faults.report_collective_failure(err, kind, quiet=restarts.pending(run_dir)))
        lines = [faults.collective_failure_line(kind)]
    finally:
        stop.restore()
        if run_dir is not None and outcome.exit_code not in (0, 130) and restarts.enabled():
            restarts.record_end(run_dir, faults.rank_from_env(), outcome.exit_code, "\n".join(lines),
                                faults.steps_done())
        faults.finish(outcome.exit_code)
        shutdown()
    return outcome
