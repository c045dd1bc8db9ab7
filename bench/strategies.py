"""Throughput and memory per strategy on 2 ranks (CPU, gloo), side by side with the estimate.

Each strategy runs in its own torchrun launch (a process's peak resident memory cannot
be reset), on a small random Llama, with the loop's own `train_step`: a few warm-up
optimizer steps, then timed ones. Per rank it records the peak resident memory
(ru_maxrss) and its growth from just before the model is built, the parameter and
optimizer bytes the strategy holds, and what `finetrain estimate` predicts.

    python bench/strategies.py [--nproc 2] [--steps 4] [--seq-len 256]

Writes bench/results/strategies.json and prints a markdown table. On CPU the
collectives are gloo over shared memory and compute is one thread per rank, so the
tokens/s show each strategy's overheads, not GPU speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = {"model_type": "llama", "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 688,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
         "max_position_embeddings": 1024, "tie_word_embeddings": False}
# (label, parallel keys, ranks)
VARIANTS = [
    ("single", {"strategy": "single"}, 1),
    ("ddp", {"strategy": "ddp"}, None),
    ("fsdp", {"strategy": "fsdp"}, None),
    ("fsdp offload", {"strategy": "fsdp", "offload": "params"}, None),
    ("zero1", {"strategy": "zero1"}, None),
    ("zero2", {"strategy": "zero2"}, None),
    ("zero3", {"strategy": "zero3"}, None),
    ("zero3 offload", {"strategy": "zero3", "offload": "params"}, None),
]


@dataclasses.dataclass
class Batch:
    """The fields of a loader batch that `train_step` reads."""

    inputs: dict
    labels: object
    num_targets: int
    labels_shifted: bool = False


def bench_config(parallel: dict, args, world: int, folder: Path):
    from trainer.config.schema import Config, DatasetConfig

    cfg = Config()
    cfg.run.output_dir = str(folder)
    cfg.model.config, cfg.model.tokenizer = dict(MODEL), "train-bpe"
    cfg.data.datasets = [DatasetConfig(name="random", path="random", format="text")]  # ids drawn in `worker`
    cfg.data.seq_len = args.seq_len
    cfg.parallel.mixed_precision = "fp32"
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    cfg.train.micro_batch_size = args.micro
    cfg.train.global_batch_size = args.micro * world
    cfg.train.max_steps = args.warmup + args.steps
    return cfg


def worker(spec: dict) -> None:
    """One rank of one variant: train, time, measure, report (rank 0 prints JSON)."""
    import torch
    import torch.distributed as dist

    from trainer.build import build_model, build_training
    from trainer.estimate.per_device import estimate_memory, resident_state_bytes
    from trainer.loop import train_step
    from trainer.model.loss import count_targets
    from trainer.model.tokenizer import train_bpe_tokenizer
    from trainer.plan import plan_run
    from trainer.runtime.distributed import init_distributed
    from trainer.runtime.memory import peak_rss_bytes

    args = argparse.Namespace(**spec["args"])
    dist_info = init_distributed()
    cfg = bench_config(spec["parallel"], args, dist_info.world_size, Path(spec["folder"]))
    tokenizer = train_bpe_tokenizer(["random tokens stand in for text here"], vocab_size=300)
    plan = plan_run(cfg, dist_info.world_size, dist_info.device.type)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    strategy = build_training(cfg, plan, dist_info, tokenizer, cfg.train.max_steps,
                              lambda: build_model(cfg, tokenizer, "sdpa")).strategy
    strategy.model.train()

    gen = torch.Generator().manual_seed(dist_info.rank)
    seconds = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, MODEL["vocab_size"], (args.micro, args.seq_len), generator=gen)
        batch = Batch({"input_ids": ids}, ids, count_targets(ids, "causal_lm"))
        dist.barrier()
        start = time.perf_counter()
        train_step(strategy, [batch], "causal_lm")
        dist.barrier()
        seconds.append(time.perf_counter() - start)
    timed = seconds[args.warmup:]
    held = resident_state_bytes(strategy)
    record = {"peak_rss": peak_rss_bytes(), "growth": peak_rss_bytes() - before, **held}
    everyone = [None] * dist_info.world_size
    dist.all_gather_object(everyone, record)
    if dist_info.is_main:
        estimate = next(r for r in estimate_memory(cfg, 1, dist_info.world_size) if r["strategy"] == cfg.parallel.strategy)
        tokens = args.micro * args.seq_len * dist_info.world_size
        print("RESULT " + json.dumps({
            "ranks": dist_info.world_size, "step_s": sum(timed) / len(timed),
            "tokens_per_s": tokens * len(timed) / sum(timed), "per_rank": everyone,
            "estimate": {k: estimate[k] for k in ("params", "gathered", "grads", "optimizer", "activations", "host", "total")},
        }), flush=True)
    dist.destroy_process_group()


def launch(label: str, parallel: dict, ranks: int, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        spec = {"parallel": parallel, "args": vars(args), "folder": folder}
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
        # A fixed mmap threshold returns every freed large tensor to the OS, so the peak
        # resident memory tracks live tensors (as a GPU allocator's peak would) instead of
        # glibc's fragmented heap after a few steps.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        # DeepSpeed's compiled ops, kept across launches (compiling takes minutes on CPU).
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / f"finetrain-torch-extensions-{os.getuid()}"))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__,
                               "--worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return {"variant": label, "parallel": parallel, **json.loads(lines[-1].removeprefix("RESULT "))}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(results: list[dict]) -> str:
    lines = ["| strategy | ranks | tokens/s | step s | peak RSS / rank (MiB) | growth / rank (MiB) | "
             "params + optimizer held / rank (MiB) | estimate / rank (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        peak = max(x["peak_rss"] for x in r["per_rank"])
        growth = max(x["growth"] for x in r["per_rank"])
        held = max(x["params"] + x["optimizer"] for x in r["per_rank"])
        estimate = r["estimate"]["total"] + r["estimate"]["host"]
        lines.append(f"| {r['variant']} | {r['ranks']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {mib(peak)} | "
                     f"{mib(growth)} | {mib(held)} | {mib(estimate)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "strategies.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    results = []
    for label, parallel, ranks in VARIANTS:
        results.append(launch(label, parallel, ranks or args.nproc, argparse.Namespace(**settings)))
        print(f"{label}: {results[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    import torch

    report = {"model": MODEL, "settings": settings, "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
