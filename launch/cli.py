"""The `finetrain` command: train, prepare, check, submit, export, estimate, eval, report.

`finetrain train` validates the config in this process first, so a bad key stops
before any worker or process group starts; with --nproc N (and --nnodes M) it then runs
torch's elastic agent, as torchrun does, which starts `python -m trainer` on every rank
(see launch/elastic.py for how it differs from plain torchrun).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from launch.check import add_check_parser
from launch.elastic import default_rdzv_id, run_ranks
from launch.evaluate import add_eval_parser
from launch.submit import add_submit_parser
from trainer.config.schema import load_config
from trainer.rank import debug_overrides, run_rank
from trainer.runtime.errors import UserError, report_user_error, say


def cmd_train(args) -> int:
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    import torch

    from trainer.plan import plan_run
    from trainer.runtime.distributed import end_process

    if args.debug and (args.nproc > 1 or args.nnodes > 1):
        return report_user_error(UserError("--debug runs a world of one; drop --nproc and --nnodes"), None)
    if args.nnodes > 1 and not args.rdzv_endpoint:
        return report_user_error(UserError(f"--nnodes {args.nnodes}: set --rdzv-endpoint HOST:PORT, the address "
                                           "of the first node (the same on every node)"), None)
    if args.nproc < 1 or args.nnodes < 1:
        return report_user_error(UserError("--nproc and --nnodes must be >= 1"), None)
    if args.max_restarts is not None and (args.max_restarts < 0 or args.debug):
        return report_user_error(UserError(f"--max-restarts {args.max_restarts}: must be >= 0" if args.max_restarts < 0
                                           else "--debug runs once; drop --max-restarts"), None)
    overrides = args.overrides
    try:
        overrides = debug_overrides(args.overrides) if args.debug else args.overrides
        cfg = load_config(args.config, overrides)
        # The ranks plan the run again; a config they would refuse stops here, before any starts.
        plan_run(cfg, args.nproc * args.nnodes, "cuda" if torch.cuda.is_available() else "cpu")
    except UserError as err:
        return report_user_error(err, args.config, overrides)
    max_restarts = args.max_restarts
    if max_restarts is None:  # in a Slurm job (slurm/train.sbatch) the config's slurm.max_restarts
        max_restarts = cfg.slurm.max_restarts if os.environ.get("SLURM_JOB_ID") and not args.debug else 0
    if args.nproc == 1 and args.nnodes == 1 and max_restarts == 0:  # this process is the rank, and ends as one
        end_process(run_rank(args.config, args.overrides, args.debug).exit_code)
    return run_ranks([args.config, *args.overrides], args.nproc, args.nnodes, args.rdzv_endpoint,
                     args.rdzv_id or default_rdzv_id(cfg.run.output_dir), scratch=cfg.output_dir / "tmp",
                     run_dir=cfg.output_dir, init_timeout_s=cfg.parallel.init_timeout_s, max_restarts=max_restarts)


def cmd_prepare(args) -> int:
    """Tokenize the run's data into the cache ahead of `train`, with the tokenizer the run
    will use (trained and saved into the run folder for train-bpe, as `train` would)."""
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.data.run_data import prepare_data, training_texts
    from trainer.model.tokenizer import load_tokenizer

    try:
        if args.workers < 1:
            raise UserError(f"--workers {args.workers}: must be at least 1")
        cfg = load_config(args.config, args.overrides)
        tokenizer = load_tokenizer(cfg, lambda: training_texts(cfg))
        prepared = prepare_data(cfg, tokenizer, args.workers)
    except UserError as err:
        return report_user_error(err, args.config, args.overrides)
    for name, data in prepared.items():
        skipped = f", {data.skipped} bad rows skipped" if data.skipped else ""
        print(f"{name}: {len(data):,} examples, {len(data.tokens):,} tokens{skipped}")
    return 0


def cmd_export(args) -> int:
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.checkpoint.export import export_checkpoint, newest_checkpoint

    try:
        checkpoint = newest_checkpoint(Path(args.checkpoint))
        out = export_checkpoint(checkpoint, Path(args.out), merge=args.merge)
    except UserError as err:
        return report_user_error(err, None)
    print(f"exported {checkpoint} to {out}" + (" (adapter merged into the weights)" if args.merge else ""))
    return 0


def cmd_estimate(args) -> int:
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.estimate.per_device import estimate_memory, format_longest, format_table, longest_seq_len

    try:
        # only the model's config.json is read: data and checkpoints may live on the cluster
        cfg = load_config(args.config, args.overrides, check_files=False)
        if not args.longest:
            print(format_table(estimate_memory(cfg, args.nodes, args.gpus_per_node)))
            return 0
        if args.gpu_memory_gib <= 0 or (args.host_memory_gib is not None and args.host_memory_gib <= 0):
            raise UserError("estimate: --gpu-memory-gib and --host-memory-gib must be > 0")
        device, host = args.gpu_memory_gib * 2**30, args.host_memory_gib and args.host_memory_gib * 2**30
        print(format_longest(longest_seq_len(cfg, args.nodes, args.gpus_per_node, device, host), device, host))
    except UserError as err:
        return report_user_error(err, args.config, args.overrides)
    return 0


def cmd_report(args) -> int:
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.reporting.html_report import write_report

    try:
        path = write_report(Path(args.run_dir))
    except UserError as err:
        return report_user_error(err, None)
    print(f"report: {path}")
    return 0


class CommandLineParser(argparse.ArgumentParser):
    """A mistake on the command line is one line and exit code 2, as every mistake of the user's is
    (argparse prints the usage too; `--help` shows it). Subcommands' parsers are of this class too."""

    def error(self, message: str):
        say(f"{self.prog}: {message} (see {self.prog} --help)")
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="finetrain", description="Distributed fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train on this machine (one process, or N through torchrun)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train.add_argument("--nproc", type=int, default=1, help="ranks on this node (torchrun's --nproc-per-node)")
    train.add_argument("--nnodes", type=int, default=1, help="nodes; run this command on each (c10d rendezvous)")
    train.add_argument("--rdzv-endpoint", help="HOST:PORT of the first node, for --nnodes > 1")
    train.add_argument("--rdzv-id", help="rendezvous id shared by the nodes (default: the Slurm job, or the run folder)")
    train.add_argument("--debug", action="store_true", help="world of one, 5 deterministic steps, print the first batch")
    train.add_argument("--max-restarts", type=int, default=None,
                       help="restart a failed attempt (a dead, killed or hung rank, a failed save) up to N times from "
                            "the newest checkpoint (default 0; in a Slurm job slurm.max_restarts)")
    train.set_defaults(run=cmd_train)

    prepare = sub.add_parser("prepare", help="tokenize the data into the memory-mapped cache ahead of a run")
    prepare.add_argument("config")
    prepare.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    prepare.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                         help="tokenizing processes (default: one per CPU this process may use)")
    prepare.set_defaults(run=cmd_prepare)

    export = sub.add_parser("export", help="write a Hugging Face folder from a checkpoint")
    export.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    export.add_argument("--out", required=True)
    export.add_argument("--merge", action="store_true", help="merge the peft adapter into the base weights")
    export.set_defaults(run=cmd_export)

    estimate = sub.add_parser("estimate", help="per-device memory before launch")
    estimate.add_argument("config")
    estimate.add_argument("overrides", nargs="*")
    estimate.add_argument("--nodes", type=int, default=1)
    estimate.add_argument("--gpus-per-node", type=int, default=1)
    estimate.add_argument("--longest", action="store_true",
                          help="the longest data.seq_len that fits each device, per strategy")
    estimate.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one device (--longest)")
    estimate.add_argument("--host-memory-gib", type=float, default=None,
                          help="host memory of one node, for what offloading keeps there (--longest; default: unbounded)")
    estimate.set_defaults(run=cmd_estimate)

    add_check_parser(sub)
    add_submit_parser(sub)
    add_eval_parser(sub)

    report = sub.add_parser("report", help="write report.html with plots from a run folder")
    report.add_argument("run_dir", help="a run folder (run.output_dir)")
    report.set_defaults(run=cmd_report)
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
