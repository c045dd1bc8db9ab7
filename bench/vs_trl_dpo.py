"""finetrain's DPO against TRL's `DPOTrainer`: SmolLM2-135M-Instruct with LoRA (r 16, alpha 32, every
linear layer but the head, no dropout), the reference the adapter switched off in both, the same
pairs in the same order, fp32, `--threads` torch threads, one process per tool, one run each.

Data: the first `--pairs` of `builtin:chatterbot-pairs` in a seeded order (questions of 2 to 40
words, answers of 1 to 200: a set of varied lengths), each a user prompt and two assistant answers
that both tools render through the model's chat template (TRL: the conversational format).
TRL takes `--pairs-per-step` pairs per optimizer step, padded to the longest of the step (its
`padding_free` is switched off for DPO); finetrain packs the same pairs pad-free into rows of
`--seq-len` tokens, one row per step (`--seq-len` chosen so that a row holds about as many pairs),
each sequence isolated, in the order its stream draws them; both train one epoch over them. The
rest is alike: AdamW (betas 0.9/0.95, eps 1e-8, no weight decay), constant `--lr`, gradients
clipped at 1.0, beta 0.1, sdpa attention (finetrain: `auto`, sdpa one document at a time on a
CPU), no activation checkpointing.

    python bench/vs_trl_dpo.py [--pairs 96] [--pairs-per-step 8] [--seq-len 1024] [--threads 2] [--warmup 2]

Per tool: pairs per second over the steps after `--warmup` (from the end of one optimizer step to
the end of the last: data, policy and reference forwards, backward, optimizer), per CPU-second of
the process, and peak RSS (the worker's own VmHWM at the end of its last step), with the loss of
the first step (ln 2 for both). Results go to bench/results/vs_trl_dpo-smollm2-135m-instruct.json;
a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import REPO, machine, run_worker, step_end, train_finetrain

TOOLS = {"finetrain": "finetrain DPO (packed pairs, target-only head)", "trl": "TRL DPOTrainer"}
MODEL = "builtin:smollm2-135m-instruct"
BETAS = (0.9, 0.95)
LORA = {"r": 16, "alpha": 32}
RESULTS = REPO / "bench" / "results" / "vs_trl_dpo-smollm2-135m-instruct.json"


def select_pairs(count: int, cache: Path) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from trainer.data.builtin import materialize

    rows = [json.loads(line) for line in materialize("builtin:chatterbot-pairs", cache).read_text().splitlines()]
    random.Random(0).shuffle(rows)
    return rows[:count]


def finetrain_worker(spec: dict, result_path: str) -> None:
    started = time.perf_counter()
    work = Path(result_path).parent
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in spec["pairs"]))
    config = {
        "run": {"name": "vs-trl-dpo", "output_dir": str(work / "finetrain-run"), "seed": 0, "overwrite": True},
        "model": {"path": MODEL, "dtype": "float32"},
        "peft": {"method": "lora", **LORA, "target_modules": "all-linear"},
        "data": {"seq_len": spec["seq_len"], "packing": True, "overlong": "error",
                 "datasets": [{"name": "pairs", "path": str(data), "format": "preference"}]},
        "preference": {"loss": "dpo", "beta": 0.1, "reference": "adapter"},
        "parallel": {"strategy": "single", "mixed_precision": "fp32"},
        "optim": {"lr": spec["lr"], "weight_decay": 0.0, "betas": list(BETAS), "scheduler": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0},
        "train": {"micro_batch_size": 1, "global_batch_size": 1, "epochs": 1, "log_every": 1, "save_every": 0},
        "checkpoint": {"resume": "never"},
        "logging": {"progress_bar": False},
    }
    path = work / "finetrain.yaml"
    path.write_text(yaml.safe_dump(config))
    run, measured = train_finetrain(str(path))
    # The pairs in the order its stream drew them (one epoch), for TRL's sequential sampler.
    stream, order = run.data.stream(run.cfg), []
    while len(order) < len(spec["pairs"]):
        order += [spec["pairs"][int(run.data.train[p.dataset].data.rows[p.example]) - 1] for p in stream.next_row()]
    Path(result_path).write_text(json.dumps({**measured, "started_s": started, "order": order[:len(spec["pairs"])]}))


def trl_worker(spec: dict, result_path: str) -> None:
    started = time.perf_counter()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainer.model.loading import resolve_model_path

    folder = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    steps = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({**step_end(), "pairs": spec["pairs_per_step"]})

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": row["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": row["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": row["rejected"]}]}
                                 for row in spec["order"]])
    args = DPOConfig(output_dir=str(Path(result_path).parent / "trl-run"), num_train_epochs=1,
                     per_device_train_batch_size=spec["pairs_per_step"], learning_rate=spec["lr"], weight_decay=0.0,
                     adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8, max_grad_norm=1.0,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                     disable_tqdm=True, dataloader_num_workers=0, seed=0, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, beta=0.1, loss_type=["sigmoid"], max_length=None,
                     train_sampling_strategy="sequential")
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[StepClock()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for step, loss in zip(steps, losses):
        step["loss"] = loss
    Path(result_path).write_text(json.dumps({"steps": steps, "started_s": started}))


def worker(tool: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    (finetrain_worker if tool == "finetrain" else trl_worker)(spec, result_path)


def summarize(measured: dict, warmup: int) -> dict:
    steps = measured["steps"]
    if len(steps) <= warmup:
        raise RuntimeError(f"{len(steps)} steps ran, not more than --warmup {warmup}")
    timed, start = steps[warmup:], steps[warmup - 1]
    pairs = sum(s["pairs"] for s in timed)
    wall, cpu = timed[-1]["end_s"] - start["end_s"], timed[-1]["end_cpu_s"] - start["end_cpu_s"]
    return {"pairs_per_s": pairs / wall, "pairs_per_cpu_s": pairs / cpu, "peak_rss_mib": steps[-1]["rss_mib"],
            "steps": len(steps), "timed_steps": len(timed), "pairs": sum(s["pairs"] for s in steps),
            "pairs_per_step": sum(s["pairs"] for s in steps) / len(steps), "first_loss": steps[0].get("loss"),
            "losses": [s.get("loss") for s in steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024, help="finetrain's packed row (one per step)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    sys.path.insert(0, str(REPO))
    from trainer.config.schema import cache_root

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = select_pairs(args.pairs, cache_root())
        spec = {"pairs": pairs, "order": pairs, "seq_len": args.seq_len, "lr": args.lr,
                "pairs_per_step": args.pairs_per_step}
        results, measured = {}, {}
        for tool in ["finetrain"] + [t for t in args.tools if t != "finetrain"]:
            if tool not in args.tools:
                continue
            if tool == "trl" and "finetrain" in measured:  # the pairs in the order finetrain trained them
                spec["order"] = measured["finetrain"]["order"]
            spec_path = work / f"{tool}-spec.json"
            spec_path.write_text(json.dumps(spec))
            before = machine()
            measured[tool] = run_worker(__file__, [tool, str(spec_path)], work / f"{tool}.json", args.threads)
            results[tool] = {"tool": TOOLS[tool], **summarize(measured[tool], args.warmup),
                             "load_average_before": before["load_average"],
                             "load_average_after": machine()["load_average"]}
    import trl
    import transformers

    report = {"machine": {**machine(), "transformers": transformers.__version__, "trl": trl.__version__},
              "settings": {k: getattr(args, k) for k in ("pairs", "pairs_per_step", "seq_len", "lr", "threads",
                                                         "warmup")},
              "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))


def table(results: dict) -> str:
    base = results.get("trl")
    lines = ["| tool | pairs/s | per CPU-s | vs TRL (pairs/s) | vs TRL (per CPU-s) | peak RSS (MiB) | vs TRL "
             "| first loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(result: dict, key: str) -> str:
        return f"{result[key] / base[key]:.2f}x" if base else ""

    for result in results.values():
        lines.append(f"| {result['tool']} | {result['pairs_per_s']:.2f} | {result['pairs_per_cpu_s']:.2f} | "
                     f"{ratio(result, 'pairs_per_s')} | {ratio(result, 'pairs_per_cpu_s')} | "
                     f"{result['peak_rss_mib']:,.0f} | {ratio(result, 'peak_rss_mib')} | {result['first_loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
