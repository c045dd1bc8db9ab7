"""`python -m trainer CONFIG [key=value ...]`: what torchrun and srun run on every rank."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from trainer.config import ConfigError, load_config


def setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


@record  # a crashing rank's traceback reaches torchrun's summary
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Run finetrain on this rank.")
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    parser.add_argument("--debug", action="store_true", help="world of one, few deterministic steps, print the first batch")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, debug_overrides(args.overrides) if args.debug else args.overrides)
    except ConfigError as err:
        print(f"finetrain: config error in {args.config}:\n{err}", file=sys.stderr)
        return err.exit_code

    from trainer.distributed import shutdown
    from trainer.loop import train

    try:
        train(cfg, debug=args.debug)
    finally:
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
    sys.exit(main())
