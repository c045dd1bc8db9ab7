"""`finetrain check CONFIG [--nproc N | --nodes N --gpus-per-node G]`: the run plan, printed, with
nothing started (no process group, no model weights, nothing written into the run folder).

It plans the run for the world named, as `finetrain train` and every rank would, and prints what
the plan decided (strategy and mesh, accumulation, dtypes, attention backend), each data set with
its example count, share of the mix and tokens, the eval sets, the checkpoint format and the
estimated memory per device. Counting examples and tokens tokenizes the data into finetrain's
cache as `finetrain prepare` does, so the run then maps it at once. A model whose hub cache holds
config.json alone (enough for the plan and the estimate) is planned all the same, its data
listed but not counted. Any problem is the one line `train` would print, exit 2.
"""

from __future__ import annotations

import math

from trainer.config.schema import load_config
from trainer.runtime.errors import UserError, report_user_error


def add_check_parser(sub) -> None:
    check = sub.add_parser("check", help="print the run plan (strategy, dtypes, data, memory) without starting it")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    check.add_argument("--nproc", type=int, help="local ranks on this machine (default 1)")
    check.add_argument("--nodes", type=int, help="nodes of a GPU cluster (with --gpus-per-node)")
    check.add_argument("--gpus-per-node", type=int, help="GPUs (ranks) per node (with --nodes)")
    check.set_defaults(run=cmd_check)


def cmd_check(args) -> int:
    try:
        nodes, per_node, device_type = check_world(args)
        cfg = load_config(args.config, args.overrides)
        print("\n".join(describe_run(cfg, nodes, per_node, device_type)))
    except UserError as err:
        return report_user_error(err, args.config, args.overrides)
    return 0


def check_world(args) -> tuple[int, int, str]:
    """(nodes, ranks per node, device type): `--nproc N` on this machine's device, or `--nodes N
    --gpus-per-node G` on CUDA GPUs."""
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.runtime.precision import process_device_type

    cluster = args.nodes is not None or args.gpus_per_node is not None
    if cluster and args.nproc is not None:
        raise UserError("check: give --nproc N (this machine) or --nodes N --gpus-per-node G (a GPU cluster), not both")
    if cluster:
        if args.nodes is None or args.gpus_per_node is None or args.nodes < 1 or args.gpus_per_node < 1:
            raise UserError("check: --nodes and --gpus-per-node go together, each >= 1")
        return args.nodes, args.gpus_per_node, "cuda"
    nproc = 1 if args.nproc is None else args.nproc
    if nproc < 1:
        raise UserError(f"check: --nproc {nproc}: must be >= 1")
    return 1, nproc, process_device_type()


def describe_run(cfg, nodes: int, per_node: int, device_type: str) -> list[str]:
    """The lines of the plan; raises the UserError `finetrain train` would."""
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.config.schema import dataset_name, is_hub_id
    from trainer.data.eval_sets import declared_sets
    from trainer.data.run_data import RunData, training_texts
    from trainer.estimate.per_device import estimate_memory
    from trainer.eval.multiple_choice import read_questions
    from trainer.model.loading import resolve_model_path
    from trainer.model.tokenizer import build_tokenizer
    from trainer.plan import plan_run
    from trainer.runtime.errors import ConfigError
    from trainer.runtime.memory import format_bytes
    from trainer.runtime.precision import compute_precision

    world = nodes * per_node
    plan = plan_run(cfg, world, device_type)
    m, t, d = plan.mesh, cfg.train, cfg.data
    precision, why = compute_precision(cfg.parallel.mixed_precision, cfg.model.dtype, device_type)
    where = f"{nodes} node(s) x {per_node} GPU(s)" if device_type == "cuda" and nodes > 1 else f"{world} rank(s)"
    lines = [f"run {cfg.run.name} -> {cfg.run.output_dir}: {where} on {device_type}",
             f"strategy    {plan.strategy}: mesh {m.replicate} replicate x {m.shard} shard, sequence groups of "
             f"{m.sequence}, {m.data_parallel} data-parallel rank(s)",
             f"batch       {t.global_batch_size} rows of up to {d.seq_len:,} tokens per step = {t.micro_batch_size} per "
             f"micro-batch x {m.data_parallel} data-parallel rank(s) x {plan.accumulation} accumulation step(s)",
             f"dtypes      master {cfg.model.dtype}, compute {precision} ({why})",
             f"attention   {plan.attention}" + (", packed rows (documents isolated)" if d.packing else ", padded rows")]

    weights_missing = None
    if cfg.model.path:
        shown = cfg.model.path
        if is_hub_id(cfg.model.path):
            shown += f" = {resolve_model_path(cfg.model.path, key='model.path')}"
            try:
                resolve_model_path(cfg.model.path, weights=True)
            except ConfigError as err:
                weights_missing = str(err)
        lines.append(f"model       {shown} ({cfg.model.task}, peft {cfg.peft.method})"
                     + (f"; weights not in the cache: {weights_missing.split('; ', 1)[-1]}" if weights_missing else ""))
    else:
        lines.append(f"model       random init of {cfg.model.config.get('model_type')} ({cfg.model.task}, peft "
                     f"{cfg.peft.method})")

    tokenizer = data = None
    try:
        tokenizer = build_tokenizer(cfg, lambda: training_texts(cfg))
    except ConfigError:
        if weights_missing is None or cfg.model.tokenizer:
            raise
    if tokenizer is not None:
        data = RunData.load(cfg, tokenizer, report=False, progress=False)
    total = sum(ds.weight for ds in d.datasets)
    steps = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epoch(s)"
    if data is not None and t.epochs is not None:
        steps += f" = {math.ceil(t.epochs * data.stream(cfg).epoch_rows() / t.global_batch_size)} steps"
    lines.append(f"data        {len(d.datasets)} data set(s) mixed by {d.mix_by}, {steps}"
                 + ("" if data is not None else "; not counted: no tokenizer in the cache (the model's config.json "
                                                "alone)"))
    for i, ds in enumerate(d.datasets):
        share = f"weight {ds.weight:g} = {100 * ds.weight / total:.1f}% of {d.mix_by}"
        counted = ""
        if data is not None:
            stream = data.train[i]
            held = sum(len(s.examples) for _, _, s in data.evaluation if s.name == stream.name and s.data is stream.data)
            counted = (f": {len(stream.data):,} examples ({len(stream.examples):,} train, {held:,} held out), "
                       f"{len(stream.data.tokens):,} tokens")
        lines.append(f"  {dataset_name(ds):<10}{ds.path} ({ds.format}), {share}{counted}")

    e = cfg.train.eval_every
    sets = declared_sets(cfg)
    lines.append(f"eval        {len(sets)} set(s), at step 0, " + (f"every {e} steps " if e else "") + "and at the end")
    for eval_set in sets:
        source = "held out of its data set" if eval_set.held_out else f"{eval_set.path} ({eval_set.format})"
        counted = ""
        if eval_set.format == "choice" and tokenizer is not None:
            counted = f": {len(read_questions(eval_set, cfg, tokenizer)):,} questions"
        elif data is not None:
            counted = "".join(f": {len(s.examples):,} examples" for _, _, s in data.evaluation if s.name == eval_set.name)
        lines.append(f"  {eval_set.name:<10}{source}{counted}")

    c = cfg.checkpoint
    lines.append(f"checkpoint  {plan.checkpoint_format} in {cfg.checkpoint_dir}, "
                 + (f"every {t.save_every} steps" if t.save_every else "at the end") + f" and on a stop, keep "
                 f"{c.keep_last}, resume {c.resume}" + (", written in the background" if c.async_ else ""))

    (row,) = [r for r in estimate_memory(cfg, nodes, per_node) if r["strategy"] == plan.strategy]
    parts = " + ".join(f"{k} {format_bytes(row[k])}" for k in ("params", "grads", "optimizer", "activations"))
    host = f"; host {format_bytes(row['host'])} (offload, async save)" if row["host"] else ""
    lines.append(f"memory      {format_bytes(row['total'])} per device = {parts}{host} (estimated: finetrain estimate)")
    return lines
