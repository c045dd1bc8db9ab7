"""Packed vs padded training on real variable-length data, on CPU.

Data: the chatterbot conversations (short chat turns) mixed with the gensim Lee news
corpus (long text documents), 80/20 by examples, through the same loader the trainer
uses. For each attention backend, two copies of a small random Llama run optimizer
steps (forward, backward, AdamW), one on packed rows and one on padded rows, steps
alternating; the benchmark reports the packing efficiency (real tokens / row slots)
and the real-token throughput of each.

    python bench/packing.py [--steps 20] [--seq-len 512]

Writes bench/results/packing.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.build import build_model
from trainer.config.schema import load_config  # noqa: E402
from trainer.data.loader import build_train_loader
from trainer.data.run_data import training_texts  # noqa: E402
from trainer.model.loss import forward_summed_loss  # noqa: E402
from trainer.model.tokenizer import train_bpe_tokenizer  # noqa: E402

MODEL = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}


def bench_config(folder: Path, seq_len: int, packing: bool, attention: str, micro: int):
    cfg = {
        "run": {"output_dir": str(folder / "run"), "seed": 0},
        "model": {"config": MODEL, "tokenizer": "train-bpe", "attention": attention},
        "data": {"seq_len": seq_len, "packing": packing,
                 "datasets": [{"name": "chatterbot", "path": "builtin:chatterbot", "format": "chat", "weight": 0.8},
                              {"name": "lee", "path": "builtin:gensim-lee", "format": "text", "weight": 0.2}]},
        "parallel": {"mixed_precision": "fp32"},
        "train": {"micro_batch_size": micro, "global_batch_size": micro, "max_steps": 1},
    }
    path = folder / f"{attention}-{packing}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


class Trial:
    """One mode's loader, model and optimizer, and its accumulated measurements."""

    def __init__(self, cfg, tokenizer, attention: str):
        self.loader = build_train_loader(cfg, tokenizer, attention, 0, 1)
        self.model = build_model(cfg, tokenizer, attention)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.real = self.slots = self.targets = 0
        self.seconds = 0.0

    def step(self, measure: bool) -> None:
        (batch,) = self.loader.next_step(1)
        start = time.perf_counter()
        loss = forward_summed_loss(self.model, batch.inputs, batch.labels, "causal_lm") / max(batch.num_targets, 1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if measure:
            self.seconds += time.perf_counter() - start
            self.real += batch.num_tokens
            self.slots += batch.num_slots
            self.targets += batch.num_targets

    def result(self, steps: int) -> dict:
        return {
            "packing_efficiency": self.real / self.slots,
            "real_tokens_per_s": self.real / self.seconds,
            "slot_tokens_per_s": self.slots / self.seconds,
            "step_time_s": self.seconds / steps,
            "real_tokens_per_step": self.real / steps,
            "targets_per_step": self.targets / steps,
            "steps_per_epoch": self.loader.steps_per_epoch(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--attention", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "packing.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = bench_config(folder, args.seq_len, True, "sdpa", args.micro_batch_size)
        tokenizer = train_bpe_tokenizer(training_texts(base), MODEL["vocab_size"])
        for attention in args.attention:
            # Packed and padded steps alternate, so a busy machine slows both alike.
            trials = {packing: Trial(bench_config(folder, args.seq_len, packing, attention, args.micro_batch_size),
                                     tokenizer, attention) for packing in (True, False)}
            for step in range(args.warmup + args.steps):
                for trial in trials.values():
                    trial.step(measure=step >= args.warmup)
            for packing, trial in trials.items():
                result = trial.result(args.steps)
                results.append({"attention": attention, "packing": packing, **result})
                print(f"{attention:>6} packing={packing!s:<5} efficiency {result['packing_efficiency']:.3f} "
                      f"real tokens/s {result['real_tokens_per_s']:,.0f}", file=sys.stderr)

    report = {
        "data": "builtin:chatterbot (chat, weight 0.8) + builtin:gensim-lee (text, weight 0.2)",
        "model": MODEL,
        "seq_len": args.seq_len,
        "micro_batch_size": args.micro_batch_size,
        "steps": args.steps,
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print("| attention | packing | efficiency | real tokens/s | step time (s) | real tokens/step | steps/epoch |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['attention']} | {'packed' if r['packing'] else 'padded'} | {r['packing_efficiency']:.1%} | "
              f"{r['real_tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | {r['real_tokens_per_step']:,.0f} | "
              f"{r['steps_per_epoch']:.0f} |")
    for attention in args.attention:
        packed, padded = (next(r for r in results if r["attention"] == attention and r["packing"] == p) for p in (True, False))
        print(f"\n{attention}: packing gives {packed['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x the real-token "
              f"throughput and needs {packed['steps_per_epoch'] / padded['steps_per_epoch']:.2f}x the steps per epoch")


if __name__ == "__main__":
    main()
