"""`python -m trainer CONFIG [key=value ...]`: what torchrun and srun run on every rank.

Exit codes: 0 when the run finished or was stopped by SIGTERM/SIGUSR1 and checkpointed;
2 for a user's mistake (config, data, files, launch layout), reported as one line
`finetrain: ...` by rank 0 for every rank that agreed on it; 130 after Ctrl-C. Anything
else is a bug of finetrain's and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from torch.distributed.elastic.multiprocessing.errors import record

from trainer.config import ConfigError, UserError, load_config, locate_problems


def setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def report_user_error(err: UserError, config: str | None, overrides: list[str] = ()) -> int:
    """Print a user's mistake as one line per problem (`finetrain: file:line: what`) and
    return its exit code. An error every rank agreed on is printed by rank 0 alone."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if getattr(err, "agreed", False) and rank != "0":
        return err.exit_code
    if os.environ.get("FINETRAIN_TRACEBACK") == "1":
        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, ConfigError):
        lines = locate_problems(str(err), config, overrides)
    else:
        lines = [line for line in str(err).splitlines() if line.strip()]
    for line in lines:
        print(f"finetrain: {line}", file=sys.stderr, flush=True)
    return err.exit_code


@record  # a rank that crashes (a bug) gets its traceback into torchrun's summary
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Run finetrain on this rank.")
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    parser.add_argument("--debug", action="store_true", help="world of one, few deterministic steps, print the first batch")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    from trainer.loop import StopSignal

    # From the start: a stop requested while the run sets up is honoured at its first step.
    stop = StopSignal()
    overrides = args.overrides
    try:
        overrides = debug_overrides(args.overrides) if args.debug else args.overrides
        cfg = load_config(args.config, overrides)
        from trainer.loop import train

        train(cfg, stop, debug=args.debug)
    except UserError as err:
        return report_user_error(err, args.config, overrides)
    except KeyboardInterrupt:
        print("finetrain: interrupted (Ctrl-C); nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    finally:
        stop.restore()
        from trainer.distributed import shutdown

        shutdown()
    return 0


def debug_overrides(overrides: list[str]) -> list[str]:
    """--debug: a few steps into a separate folder, nothing resumed or uploaded."""
    from trainer.config import parse_override

    given = {parse_override(o)[0] for o in overrides}
    extra = ["train.epochs=null", "checkpoint.resume=never", "logging.wandb.mode=disabled"]
    if "train.max_steps" not in given:
        extra.append("train.max_steps=5")
    return list(overrides) + extra


if __name__ == "__main__":
    code = main()  # a bug raises out of main with its traceback
    from trainer.distributed import end_process

    end_process(code)
