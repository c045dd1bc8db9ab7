"""Peak resident memory of LoRA and QLoRA (model.quantization: nf4) on SmolLM2-135M, on CPU.

Each variant runs in a process of its own (a process's peak is a high-water mark): the
trainer sets up (tokenizer, data, model, strategy) as `finetrain train` does, then the
loop's own `train_step` runs a few optimizer steps. Recorded per variant: the peak
resident memory of the set-up (the model load included), the peak of the training
steps alone (Linux resets the high-water mark on request, /proc/self/clear_refs), the
resident memory after set-up split into anonymous memory and file pages (weights that
stay memory-mapped from the safetensors file count there), and the parameter and
optimizer bytes the strategy holds.

    python bench/qlora_memory.py [--steps 3] [--seq-len 256]

Writes bench/results/qlora_memory.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = "builtin:smollm2-135m-instruct"
VARIANTS = {"lora": "none", "qlora": "nf4"}  # label: model.quantization
MiB = 2**20


def process_memory() -> dict:
    """This process's resident memory now and its high-water mark, in bytes (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return {"peak": fields["VmHWM"], "resident": fields["VmRSS"], "anonymous": fields["RssAnon"],
            "file": fields["RssFile"]}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def variant_config(folder: Path, quantization: str, seq_len: int, steps: int) -> dict:
    return {
        "run": {"name": f"qlora-memory-{quantization}", "output_dir": str(folder / quantization), "seed": 0},
        "model": {"path": MODEL, "dtype": "float32", "quantization": quantization, "attention": "sdpa"},
        "peft": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"seq_len": seq_len, "packing": True, "cache_dir": str(folder / "cache"),
                 "datasets": [{"name": "chat", "path": "builtin:chatterbot", "format": "chat"}]},
        "parallel": {"strategy": "single", "mixed_precision": "fp32"},
        "train": {"micro_batch_size": 1, "global_batch_size": 1, "max_steps": steps},
        "logging": {"progress_bar": False, "jsonl": False},
    }


def measure(config_path: Path, steps: int) -> dict:
    """In the child: set up as the trainer does, then run `steps` optimizer steps."""
    import torch

    from trainer.config.schema import load_config
    from trainer.estimate.per_device import resident_state_bytes
    from trainer.loop import Trainer, train_step

    torch.manual_seed(0)
    trainer = Trainer(load_config(config_path))
    after_setup = process_memory()
    reset_peak()
    trainer.strategy.model.train()
    losses = []
    for _ in range(steps):
        batches = trainer.loader.next_step(trainer.accum)
        losses.append(train_step(trainer.strategy, batches, "causal_lm")["loss"])
    return {"setup": after_setup, "steps_peak": process_memory()["peak"], "losses": losses,
            **resident_state_bytes(trainer.strategy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "qlora_memory.json")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child[1]).write_text(json.dumps(measure(Path(args.child[0]), args.steps)))
        return

    import torch
    import yaml

    from trainer.model.loading import resolve_model_path

    resolve_model_path(MODEL)  # converts the GGUF once, outside the measured processes
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, quantization in VARIANTS.items():
            config = folder / f"{label}.yaml"
            config.write_text(yaml.safe_dump(variant_config(folder, quantization, args.seq_len, args.steps)))
            result = folder / f"{label}.json"
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1",
                       TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
            subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", str(config), str(result)],
                           check=True, env=env, cwd=REPO)
            results[label] = json.loads(result.read_text())
            print(f"{label}: peak {max(results[label]['setup']['peak'], results[label]['steps_peak']) / MiB:,.0f} MiB",
                  file=sys.stderr)

    report = {
        "model": MODEL, "peft": "lora r 16, all-linear", "seq_len": args.seq_len, "micro_batch_size": 1,
        "steps": args.steps, "compute": "float32", "device": "cpu", "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print("| variant | peak RSS (MiB) | set-up peak | steps peak | resident after set-up: anonymous + file | "
          "parameters held | optimizer state |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        s = r["setup"]
        print(f"| {label} | {max(s['peak'], r['steps_peak']) / MiB:,.0f} | {s['peak'] / MiB:,.0f} | "
              f"{r['steps_peak'] / MiB:,.0f} | {s['anonymous'] / MiB:,.0f} + {s['file'] / MiB:,.0f} | "
              f"{r['params'] / MiB:,.1f} | {r['optimizer'] / MiB:,.1f} |")


if __name__ == "__main__":
    main()
