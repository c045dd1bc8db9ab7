"""`python -m trainer CONFIG [key=value ...] [--debug]`: what torchrun and srun run on every
rank (see trainer/rank.py for what a rank does and its exit codes)."""

from __future__ import annotations

import argparse

from torch.distributed.elastic.multiprocessing.errors import record

from trainer.rank import run_rank
from trainer.runtime.distributed import end_process


@record  # a rank that crashes (a bug) gets its traceback into torchrun's summary
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Run finetrain on this rank.")
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    parser.add_argument("--debug", action="store_true", help="world of one, few deterministic steps, print the first batch")
    args = parser.parse_intermixed_args(argv)
    return run_rank(args.config, args.overrides, args.debug).exit_code


if __name__ == "__main__":
    end_process(main())  # a bug raises out of main with its traceback
