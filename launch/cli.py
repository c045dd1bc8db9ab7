"""The `finetrain` command: train, prepare, submit, export, estimate.

`finetrain train` validates the config in this process first, so a bad key stops
before any worker or process group starts; with --nproc N it then hands over to
torchrun, which runs `python -m trainer` on every rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from launch.submit import add_submit_parser
from trainer.config import ConfigError, load_config


def cmd_train(args) -> int:
    from trainer.__main__ import debug_overrides, main as run_rank

    if args.debug and args.nproc > 1:
        print("finetrain: --debug runs a world of one; drop --nproc", file=sys.stderr)
        return 2
    overrides = debug_overrides(args.overrides) if args.debug else args.overrides
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"finetrain: config error in {args.config}:\n{err}", file=sys.stderr)
        return err.exit_code
    if args.nproc == 1:
        return run_rank([args.config, *args.overrides] + (["--debug"] if args.debug else []))
    # torchrun and its workers keep their temporary files under the run folder.
    scratch = Path(cfg.run.output_dir) / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(scratch.resolve()), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(args.nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
        # SIGTERM/SIGUSR1 reach every rank, which checkpoint and exit 0 within the timeout.
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "300",
        "-m", "trainer", args.config, *args.overrides,
    ]
    # Become torchrun, so signals sent to this process (scheduler, Ctrl-C) reach it directly.
    os.execve(sys.executable, command, env)


def cmd_prepare(args) -> int:
    """Tokenize the run's data into the cache ahead of `train`, with the tokenizer the run
    will use (trained and saved into the run folder for train-bpe, as `train` would)."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"finetrain: config error in {args.config}:\n{err}", file=sys.stderr)
        return err.exit_code
    if args.workers < 1:
        print("finetrain prepare: --workers must be at least 1", file=sys.stderr)
        return 2
    from trainer.data import DataError, prepare_data, training_texts
    from trainer.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg, lambda: training_texts(cfg))
        prepared = prepare_data(cfg, tokenizer, args.workers)
    except (DataError, ConfigError) as err:
        print(f"finetrain: {err}", file=sys.stderr)
        return 2
    for name, data in prepared.items():
        skipped = f", {data.skipped} bad rows skipped" if data.skipped else ""
        print(f"{name}: {len(data):,} examples, {len(data.tokens):,} tokens{skipped}")
    return 0


def cmd_export(args) -> int:
    from trainer.checkpoint import export_checkpoint

    try:
        out = export_checkpoint(Path(args.checkpoint), Path(args.out), merge=args.merge)
    except (FileNotFoundError, ValueError) as err:
        print(f"finetrain export: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}")
    return 0


def cmd_estimate(args) -> int:
    from trainer.estimate import estimate_memory, format_table

    try:
        # only the model's config.json is read: data and checkpoints may live on the cluster
        cfg = load_config(args.config, args.overrides, check_files=False)
    except ConfigError as err:
        print(f"finetrain: config error in {args.config}:\n{err}", file=sys.stderr)
        return err.exit_code
    print(format_table(estimate_memory(cfg, args.nodes, args.gpus_per_node)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetrain", description="Distributed fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train on this machine (one process, or N through torchrun)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train.add_argument("--nproc", type=int, default=1, help="local processes (ranks)")
    train.add_argument("--debug", action="store_true", help="world of one, 5 deterministic steps, print the first batch")
    train.set_defaults(run=cmd_train)

    prepare = sub.add_parser("prepare", help="tokenize the data into the memory-mapped cache ahead of a run")
    prepare.add_argument("config")
    prepare.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    prepare.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                         help="tokenizing processes (default: one per CPU this process may use)")
    prepare.set_defaults(run=cmd_prepare)

    export = sub.add_parser("export", help="write a Hugging Face folder from a checkpoint")
    export.add_argument("checkpoint")
    export.add_argument("--out", required=True)
    export.add_argument("--merge", action="store_true", help="merge the peft adapter into the base weights")
    export.set_defaults(run=cmd_export)

    estimate = sub.add_parser("estimate", help="per-device memory before launch")
    estimate.add_argument("config")
    estimate.add_argument("overrides", nargs="*")
    estimate.add_argument("--nodes", type=int, default=1)
    estimate.add_argument("--gpus-per-node", type=int, default=1)
    estimate.set_defaults(run=cmd_estimate)

    add_submit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`train cfg.yaml --nproc 2 optim.lr=1e-5`).
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
