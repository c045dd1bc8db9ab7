"""The loss head and compilation: plain head vs target-only fused head, eager vs compiled
decoder layers, on CPU with the real training loop.

A random 16M-parameter Llama with SmolLM2's 49,152-token vocabulary and tied embeddings
(hidden 256, 4 layers: the LM head is most of the FLOPs), or `--model PATH` (e.g.
`builtin:smollm2-135m-instruct`), trains on chat data in packed
rows of `--seq-len`, float32, one process: each news story of gensim's Lee corpus is a
conversation whose user turn asks to continue its first `--prompt-share` of words and
whose assistant turn is the rest, so about that share of the tokens (plus the chat
template's) are no targets. Every variant runs in a process of its own (peak
resident memory cannot be reset), `--repeats` times, interleaved so that other load on
the machine hits all variants alike; the first `--warmup` steps of each run (compilation
included) are not timed.

    python bench/loss_head.py [--model random-16m] [--steps 8] [--warmup 2] [--repeats 2] [--seq-len 1024]
                              [--micro 2] [--threads 1] [--variants ...]

Writes bench/results/loss_head-<model>.json and prints a markdown table: real input tokens per
CPU-second of the training process (other load on a shared machine does not inflate it)
and per wall-clock second (median over runs of each run's timed steps), the peak resident
memory, the final loss, the first step's CPU time (compilation), and the compile report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml
from harness import RANDOM_16M, REPO, machine, run_worker, train_finetrain

VARIANTS = {  # label: train.* overrides
    "plain head": {"fused_loss": False},
    "fused head": {"fused_loss": True},
    "fused head + compile": {"fused_loss": True, "compile": True},
}


def write_chat_data(folder: Path, prompt_share: float) -> Path:
    """Lee news stories as 'continue this story' conversations."""
    from trainer.data.builtin import materialize

    rows = []
    for line in materialize("builtin:gensim-lee", folder / "cache").read_text().splitlines():
        words = json.loads(line)["text"].split()
        cut = max(1, round(len(words) * prompt_share))
        rows.append({"messages": [{"role": "user", "content": "Continue this story: " + " ".join(words[:cut])},
                                  {"role": "assistant", "content": " ".join(words[cut:])}]})
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_config(folder: Path, label: str, run: int, args) -> Path:
    cfg = {
        "run": {"name": label, "output_dir": str(folder / f"{label.replace(' ', '-')}-{run}"), "seed": 0},
        "model": {"config": RANDOM_16M, "tokenizer": "builtin:smollm2-135m-instruct", "attention": "sdpa"}
        if args.model == "random-16m" else {"path": args.model, "attention": "sdpa"},
        "data": {"seq_len": args.seq_len, "packing": True, "cache_dir": str(folder / "cache"),
                 "datasets": [{"name": "chat", "path": str(folder / "chat.jsonl"), "format": "chat"}]},
        "parallel": {"strategy": "single", "mixed_precision": "fp32"},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": args.micro, "global_batch_size": args.micro, "max_steps": args.steps,
                  **VARIANTS[label]},
        "checkpoint": {"resume": "never"},
        "logging": {"progress_bar": False},
    }
    path = folder / f"{label.replace(' ', '-')}-{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_variant(config: Path, args) -> dict:
    """One training run in a fresh process (`--worker`); its steps after the warm-up."""
    measured = run_worker(__file__, [str(config)], config.with_suffix(".json"), args.threads)
    steps, timed = measured["steps"], measured["steps"][args.warmup:]
    real = sum(s["real_tokens"] for s in timed)
    return {
        "tokens_per_cpu_s": real / sum(s["cpu_s"] for s in timed),
        "tokens_per_s": real / sum(s["wall_s"] for s in timed),
        "target_share": sum(s["targets"] for s in steps) / sum(s["real_tokens"] for s in steps),
        "first_step_cpu_s": steps[0]["cpu_s"],
        "first_step_s": steps[0]["wall_s"],
        "peak_rss_mib": measured["peak_rss_mib"],
        "final_loss": steps[-1]["loss"],
        "compile": measured["compile"],
    }


def worker(config: str, result_path: str) -> None:
    _, measured = train_finetrain(config)
    Path(result_path).write_text(json.dumps(measured))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--model", default="random-16m",
                        help="random-16m, or a model.path such as builtin:smollm2-135m-instruct")
    parser.add_argument("--prompt-share", type=float, default=0.4, help="share of each story's words in the prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    runs: dict[str, list] = {label: [] for label in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        write_chat_data(Path(tmp), args.prompt_share)
        for repeat in range(args.repeats):
            for label in args.variants:
                result = run_variant(write_config(Path(tmp), label, repeat, args), args)
                print(f"{label} #{repeat}: {json.dumps(result)}", flush=True)
                runs[label].append(result)

    summary = {}
    for label, results in runs.items():
        summary[label] = {
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in results),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in results),
            "target_share": results[0]["target_share"],
            "final_loss": results[0]["final_loss"],
            "first_step_s": max(r["first_step_s"] for r in results),
            "first_step_cpu_s": max(r["first_step_cpu_s"] for r in results),
            "compile": results[0]["compile"],
            "runs": results,
        }
    base = summary[args.variants[0]]
    lines = [f"| variant | tokens per CPU-s | vs {args.variants[0]} | tokens/s (wall) | peak RSS (MiB) | "
             f"vs {args.variants[0]} | final loss | first step (CPU-s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in summary.items():
        lines.append(f"| {label} | {row['tokens_per_cpu_s']:,.0f} | "
                     f"{row['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x | {row['tokens_per_s']:,.0f} | "
                     f"{row['peak_rss_mib']:,.0f} | {row['peak_rss_mib'] / base['peak_rss_mib']:.2f}x | "
                     f"{row['final_loss']:.4f} | {row['first_step_cpu_s']:.1f} |")
    print("\n".join(lines))
    print(f"targets: {base['target_share']:.0%} of input tokens")
    for label, row in summary.items():
        if row["compile"]:
            print(f"{label}: {row['compile']}")

    out = REPO / "bench" / "results" / f"loss_head-{args.model.removeprefix('builtin:')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(),
                               "settings": {**{k: v for k, v in vars(args).items() if k != "worker"},
                                            "model_config": RANDOM_16M if args.model == "random-16m" else None},
                               "results": summary}, indent=1))


if __name__ == "__main__":
    main()
