"""Where the time of a training step goes: finetrain's loop on chat + news data, a few optimizer
steps after the warm-up recorded with torch.profiler (CPU), the time grouped by operator and by
the part of the step it belongs to (forward, backward, the fused loss head, the optimizer, ...).

    python bench/profile_step.py [--model builtin:smollm2-135m-instruct] [--dtype bf16] [--threads 1]
                                 [--warmup 3] [--steps 2] [key=value ...]

Writes bench/results/profile-<model>-<dtype>.json (the 40 operators with the most self time, and
the parts) and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import RANDOM_16M, REPO, machine

sys.path.insert(0, str(REPO))


def config(folder: Path, args, overrides: list[str]) -> Path:
    model = {"config": dict(RANDOM_16M), "tokenizer": "train-bpe"} if args.model == "random-16m" else {"path": args.model}
    cfg = {
        "run": {"name": "profile", "output_dir": str(folder / "run"), "seed": 0},
        "model": model,
        "data": {"seq_len": args.seq_len, "datasets": [
            {"name": "chat", "path": "builtin:chatterbot", "format": "chat", "weight": 0.8},
            {"name": "lee", "path": "builtin:gensim-lee", "format": "text", "weight": 0.2}]},
        "parallel": {"mixed_precision": args.dtype},
        "optim": {"lr": 5e-5, "weight_decay": 0.0, "scheduler": "constant"},
        "train": {"micro_batch_size": args.micro, "global_batch_size": args.micro,
                  "max_steps": args.warmup + args.steps, "compile": True},
        "checkpoint": {"resume": "never"},
        "logging": {"progress_bar": False},
    }
    path = folder / "profile.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shapes", action="store_true", help="group the operators by input shapes too")
    args, overrides = parser.parse_known_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from torch.profiler import ProfilerActivity, profile

    import trainer.loop as loop
    from trainer.config.schema import load_config

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config(Path(tmp), args, overrides), overrides)
        step = loop.train_step
        seen = {"n": 0}
        records = {}

        def profiled_step(strategy, batches, task, objective=None):
            seen["n"] += 1
            if seen["n"] <= args.warmup:
                return step(strategy, batches, task, objective)
            wall, cpu = time.perf_counter(), time.process_time()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
                result = step(strategy, batches, task, objective)
            records.setdefault("profiles", []).append(prof.key_averages(group_by_input_shape=args.shapes))
            records.setdefault("wall_s", []).append(time.perf_counter() - wall)
            records.setdefault("cpu_s", []).append(time.process_time() - cpu)
            records.setdefault("tokens", []).append(sum(b.num_tokens for b in batches))
            return result

        loop.train_step = profiled_step
        loop.Trainer(cfg).fit()

    totals: dict[str, float] = {}
    for averages in records["profiles"]:
        for event in averages:
            key = f"{event.key} {event.input_shapes}" if args.shapes else event.key
            totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1e6
    profiled = sum(totals.values())
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:40]
    report = {
        "machine": machine(), "settings": {**vars(args), "overrides": overrides},
        "steps": len(records["wall_s"]), "wall_s": records["wall_s"], "cpu_s": records["cpu_s"],
        "tokens": records["tokens"], "profiled_self_s": profiled,
        "top_operators": [{"operator": k, "self_s": v, "share": v / profiled} for k, v in top],
    }
    name = Path(args.model).name.removeprefix("builtin:") if not args.model.startswith("builtin:") \
        else args.model.removeprefix("builtin:")
    out = REPO / "bench" / "results" / f"profile-{name}-{args.dtype}{'-shapes' if args.shapes else ''}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"{report['steps']} steps, wall {sum(report['wall_s']):.1f} s, CPU {sum(report['cpu_s']):.1f} s, "
          f"{sum(report['tokens'])} tokens")
    for row in report["top_operators"]:
        print(f"{row['share']:6.1%} {row['self_s']:8.2f} s  {row['operator']}")


if __name__ == "__main__":
    main()
