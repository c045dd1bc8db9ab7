"""Long rows on CPU: sequence parallelism over 2 ranks against one rank holding whole rows.

A small random Llama (fp32, sdpa, FSDP2, activation checkpointing off) trains on rows of 4K, 8K and
16K tokens, one document per row, through the trainer's own set-up and `train_step`: with
`parallel.sequence_parallel: 1` on one rank, and with 2 on two ranks (one sequence group: both
read the same row, each computes half of its tokens). Same kernel either way: a row that is one
whole document runs sdpa's causal flash kernel, without a mask, at N=1 as in each document of
the sharded attention at N=2.

Per rank: peak resident memory during the measured steps (the process's own VmHWM from
/proc/self/status, reset after a warm-up step), the resident memory before them (the model,
gradients' buffers and AdamW state, after a warm-up step has allocated them), their difference
(what the steps themselves used: activations, above all), and the estimate's activations for
the same rank. Tokens/s counts the row's tokens over the step's wall time.

    python bench/long_context.py [--lengths 4096 8192 16384] [--steps 2]

Writes bench/results/long_context.json and prints a markdown table. glibc is told to return
freed blocks of 64 KiB and more to the system at once (MALLOC_MMAP_THRESHOLD_), so that the
resident size follows what is allocated and one step's freed activations do not count as the
next one's baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = {"model_type": "llama", "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 688,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
         "max_position_embeddings": 32768, "tie_word_embeddings": False}
ROWS = 8  # documents of exactly seq_len tokens: one row each, more than the steps need


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_inputs(folder: Path, seq_len: int) -> dict:
    """A tokenizer folder and a `tokenized` data set of ROWS random documents of seq_len tokens."""
    import random

    from trainer.model.tokenizer import train_bpe_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "long documents make long rows"] * 8
    tokenizer = train_bpe_tokenizer(texts, vocab_size=256)
    tokenizer.save_pretrained(folder / "tokenizer")
    rng = random.Random(seq_len)
    with open(folder / "docs.jsonl", "w") as f:
        for _ in range(ROWS):
            f.write(json.dumps({"input_ids": [rng.randrange(1, len(tokenizer)) for _ in range(seq_len)]}) + "\n")
    return {"tokenizer": str(folder / "tokenizer"), "data": str(folder / "docs.jsonl")}


def run_config(spec: dict) -> dict:
    return {
        "run": {"name": "long-context", "output_dir": spec["out"], "seed": 0},
        "model": {"config": MODEL, "tokenizer": spec["tokenizer"], "attention": "sdpa"},
        "data": {"seq_len": spec["seq_len"], "packing": False, "cache_dir": spec["cache"],
                 "datasets": [{"name": "docs", "path": spec["data"], "format": "tokenized"}]},
        "parallel": {"strategy": "fsdp", "mixed_precision": "fp32", "sequence_parallel": spec["sequence_parallel"]},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "train": {"micro_batch_size": 1, "global_batch_size": 1, "max_steps": 1 + spec["steps"]},
        "checkpoint": {"resume": "never"},
        "logging": {"progress_bar": False, "jsonl": False},
    }


def worker(spec_path: str) -> None:
    """One rank: set up as the trainer does, one warm-up step, then the measured steps."""
    import gc

    import torch.distributed as dist

    from trainer.config.schema import load_config
    from trainer.estimate.per_device import estimate_memory
    from trainer.loop import Trainer, train_step

    spec = json.loads(Path(spec_path).read_text())
    trainer = Trainer(load_config(spec["config"]))
    strategy, plan = trainer.strategy, trainer.plan
    strategy.model.train()
    train_step(strategy, trainer.loader.next_step(plan.accumulation), "causal_lm")  # moments, lazy code
    gc.collect()
    dist.barrier()
    before_kib = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    seconds, tokens = [], 0
    for _ in range(spec["steps"]):
        batches = trainer.loader.next_step(plan.accumulation)
        dist.barrier()
        start = time.perf_counter()
        result = train_step(strategy, batches, "causal_lm")
        seconds.append(time.perf_counter() - start)
        tokens += spec["seq_len"]
    peak_kib = status_kib("VmHWM")
    estimate = next(r for r in estimate_memory(trainer.cfg, 1, dist.get_world_size()) if r["strategy"] == "fsdp")
    mine = {"rank": dist.get_rank(), "peak_rss_mib": peak_kib / 1024, "before_steps_rss_mib": before_kib / 1024,
            "steps_mib": (peak_kib - before_kib) / 1024, "step_s": seconds, "last_loss": result["loss"],
            "estimated_activations_mib": estimate["activations"] / 2**20}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        total_s = sum(max(rank["step_s"][i] for rank in everyone) for i in range(spec["steps"]))
        Path(spec["result"]).write_text(json.dumps({"ranks": everyone, "tokens_per_s": tokens / total_s}))
    dist.barrier()
    dist.destroy_process_group()


def measure(seq_len: int, sequence_parallel: int, steps: int, folder: Path, inputs: dict) -> dict:
    import yaml

    name = f"L{seq_len}-N{sequence_parallel}"
    spec = {"seq_len": seq_len, "sequence_parallel": sequence_parallel, "steps": steps, "out": str(folder / name),
            "cache": str(folder / "cache"), "result": str(folder / f"{name}.json"), **inputs}
    spec["config"] = str(folder / f"{name}.yaml")
    Path(spec["config"]).write_text(yaml.safe_dump(run_config(spec)))
    spec_path = folder / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(sequence_parallel),
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", str(Path(__file__).resolve()),
                           "--worker", str(spec_path)], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return {"seq_len": seq_len, "sequence_parallel": sequence_parallel, "ranks_launched": sequence_parallel,
            "load_average": [round(x, 2) for x in os.getloadavg()], **json.loads(Path(spec["result"]).read_text())}


def table(results: list[dict]) -> str:
    lines = ["| seq_len | ranks x N | peak RSS per rank (MiB) | before the steps (MiB) | used by the steps (MiB) | "
             "vs N=1 | estimated activations (MiB) | tokens/s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    alone = {r["seq_len"]: max(rank["steps_mib"] for rank in r["ranks"]) for r in results if r["sequence_parallel"] == 1}
    for r in results:
        used = max(rank["steps_mib"] for rank in r["ranks"])

        def per_rank(key: str) -> str:
            return " / ".join(f"{rank[key]:,.0f}" for rank in r["ranks"])

        lines.append(f"| {r['seq_len']:,} | {r['ranks_launched']} x {r['sequence_parallel']} | "
                     f"{per_rank('peak_rss_mib')} | {per_rank('before_steps_rss_mib')} | {per_rank('steps_mib')} | "
                     f"{used / alone[r['seq_len']]:.2f}x | {r['ranks'][0]['estimated_activations_mib']:,.0f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    from harness import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in args.lengths:
            folder = Path(tmp) / str(seq_len)
            folder.mkdir()
            inputs = write_inputs(folder, seq_len)
            for sequence_parallel in (1, 2):
                results.append(measure(seq_len, sequence_parallel, args.steps, folder, inputs))
                print(json.dumps(results[-1]), flush=True)
    report = {"model": MODEL, "steps": args.steps, "machine": machine(), "results": results}
    out = REPO / "bench" / "results" / "long_context.json"
    out.write_text(json.dumps(report, indent=1))
    print(table(results))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        main()
