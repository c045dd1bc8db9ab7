"""finetrain against its peers: one model, the same examples in the same order, the same
optimizer, through finetrain's own loop, transformers' `Trainer` (padded batches, and padding-free
with `DataCollatorWithFlattening`) and TRL's `SFTTrainer` (packing, best-fit decreasing); CPU,
float32, full fine-tuning, one process per tool, run one after another.

Data: chatterbot's conversations (the assistant turns are the targets) and the news stories of
gensim's Lee corpus (every token a target), tokenized once with finetrain's encoders and the
model's tokenizer, cut to `--seq-len`, and written as finetrain's `format: tokenized` (input_ids,
labels with -100 = no target); every tool is fed these very ids. `--held-out` examples of each
source, spread over it, are set aside. finetrain shuffles and packs: the examples its first `--steps` optimizer
steps consume, in the order it consumes them, are every tool's training set, and each tool runs
one epoch over exactly them (Trainer: sequential sampler; TRL: no shuffle, but its best-fit-
decreasing packing reorders by length). Tokens per optimizer step agree on average: finetrain and
TRL take `--micro` rows of `--seq-len` tokens, the Trainer runs the number of examples finetrain's
rows held per step on average (padded: in micro-batches of `--padded-micro`, accumulated).

Everywhere: AdamW (betas 0.9/0.95, eps 1e-8, no weight decay; the peers' default implementation,
torch's fused kernel, finetrain's per-parameter loop), constant `--lr`, gradients clipped at 1.0,
sdpa attention, no activation checkpointing, the loss the mean over the step's target tokens.
finetrain runs with its defaults plus `train.compile=true` (target-only fused head, compiled
decoder layers), and once more with `train.fused_loss=false train.compile=false` (plain head, eager).

    python bench/vs_peers.py [--model random-16m|PATH] [--steps 30] [--warmup 5] [--seq-len 1024]
                             [--micro 2] [--padded-micro 4] [--threads 1] [--tools ...]

Per tool: real (non-padding) input tokens per second over the steps after `--warmup`, from the
end of one optimizer step to the end of the next (data, forward, backward, optimizer: the first
steps, compilation included, are not timed), and per CPU-second of the process (other load on
the machine does not inflate that); peak RSS (ru_maxrss) at the end of the last step; the last
step's training loss; and the held-out loss after training (per target token, of each source and of
both), the same computation for every tool (each held-out example alone, eager): the tools group
the examples into steps differently, so that is the final loss to compare. Writes
bench/results/vs_peers-<model>.json and prints a markdown table with each tool's ratios to finetrain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import yaml

from harness import RANDOM_16M, REPO, machine, run_worker, step_end, train_finetrain

TOOLS = {
    "finetrain": "finetrain, fused head + compiled layers",
    "finetrain-plain": "finetrain, plain head, eager",
    "trainer-padded": "Trainer, padded (DataCollatorForSeq2Seq)",
    "trainer-flattening": "Trainer + DataCollatorWithFlattening",
    "trl-packing": "TRL SFTTrainer, packing bfd",
}
FINETRAIN_TRAIN = {"finetrain": {"compile": True}, "finetrain-plain": {"fused_loss": False, "compile": False}}
BETAS = (0.9, 0.95)  # finetrain's default; the peers are given the same
IGNORE = -100


# ----------------------------------------------------------------------------- set-up (parent)


def model_folder(model: str, work: Path) -> Path:
    """The Hugging Face folder every tool loads: the random 16M Llama (seeded, with SmolLM2's
    tokenizer) written once, or a model.path (`builtin:` ones are converted once by finetrain)."""
    from trainer.models import resolve_model_path

    if model != "random-16m":
        return Path(resolve_model_path(model))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = work / "random-16m"
    params = dict(RANDOM_16M)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct")).save_pretrained(folder)
    return folder


def tokenized_examples(tokenizer, seq_len: int, cache: Path) -> dict[str, list[dict]]:
    """Chatterbot conversations ("chat") and Lee stories ("text") as input_ids + labels, cut to
    `seq_len` tokens; an example left with no target after its first token is dropped."""
    from trainer.data.builtin import materialize
    from trainer.data.formats import build_encoder, field_names

    sources = {}
    for source, fmt in (("builtin:chatterbot", "chat"), ("builtin:gensim-lee", "text")):
        examples = sources[fmt] = []
        encoder = build_encoder(fmt, tokenizer, field_names(fmt, {}, source), train_on_prompt=False)
        for line in materialize(source, cache).read_text().splitlines():
            encoded = encoder.encode(json.loads(line))
            ids = [int(t) for t in encoded.tokens[:seq_len]]
            labels = [t if target else IGNORE for t, target in zip(ids, encoded.targets)]
            if any(label != IGNORE for label in labels[1:]):
                examples.append({"input_ids": ids, "labels": labels})
    return sources


def finetrain_config(work: Path, tool: str, args, model: Path) -> Path:
    cfg = {
        "run": {"name": tool, "output_dir": str(work / tool), "seed": 0},
        "model": {"path": str(model)},
        "data": {"seq_len": args.seq_len, "cache_dir": str(work / "cache"),
                 "datasets": [{"name": "chat-and-lee", "path": str(work / "train.jsonl"), "format": "tokenized"}]},
        "parallel": {"mixed_precision": "fp32"},
        "optim": {"lr": args.lr, "weight_decay": 0.0, "betas": list(BETAS), "scheduler": "constant"},
        "train": {"micro_batch_size": args.micro, "global_batch_size": args.micro, "max_steps": args.steps,
                  **FINETRAIN_TRAIN[tool]},
        "checkpoint": {"resume": "never"},
        "logging": {"progress_bar": False},
    }
    path = work / f"{tool}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def finetrain_order(config: Path, tokenizer, steps: int, micro: int) -> list[int]:
    """The examples (line numbers of train.jsonl) that finetrain's first `steps` optimizer
    steps consume, in order: its own loader, run without a model."""
    from trainer.config import load_config
    from trainer.data.loader import build_train_loader

    loader = build_train_loader(load_config(config), tokenizer, "sdpa", rank=0, world_size=1)
    return [piece.example for _ in range(steps * micro) for piece in loader.stream.next_row()]


# ----------------------------------------------------------------------------- workers


def held_out_loss(model, sets: dict[str, list[dict]]) -> dict[str, float]:
    """Mean cross-entropy per target token of each set of held-out examples and of all of them,
    each example run alone (no padding, no packing), eager and without gradients: the same
    numbers whichever tool trained the model."""
    import torch
    import torch.nn.functional as F

    sums = {}
    model.eval()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for name, examples in sets.items():
            total, count = 0.0, 0
            for example in examples:
                logits = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0, :-1]
                targets = torch.tensor(example["labels"][1:])
                total += F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum").item()
                count += int((targets != IGNORE).sum())
            sums[name] = (total, count)
    losses = {name: total / count for name, (total, count) in sums.items()}
    return {**losses, "all": sum(t for t, _ in sums.values()) / sum(c for _, c in sums.values())}


def finetrain_worker(tool: str, spec: dict, result_path: str) -> None:
    started = time.perf_counter()
    run, measured = train_finetrain(spec["configs"][tool])
    Path(result_path).write_text(json.dumps({
        **measured, "started_s": started,
        "held_out_loss": held_out_loss(run.strategy.unwrapped_model(), spec["held_out"])}))


def peer_worker(tool: str, spec: dict, result_path: str) -> None:
    started = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.padding_side = "right"  # positions count from the first token, as in training without padding
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    # transformers keeps flattened documents apart through their restarting position_ids only
    # when no KV cache is built (with one, every token attends to every earlier one in the row).
    model.config.use_cache = False

    seen = {"real": 0, "slots": 0}

    def count_tokens(module, args, kwargs):
        mask, ids = kwargs.get("attention_mask"), kwargs["input_ids"]
        seen["real"] += int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()
        seen["slots"] += ids.numel()

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    steps = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({**step_end(), "real_tokens": seen["real"], "slots": seen["slots"]})
            seen.update(real=0, slots=0)

    columns = {"input_ids": [e["input_ids"] for e in spec["train"]], "labels": [e["labels"] for e in spec["train"]]}
    if tool == "trainer-padded":
        columns["attention_mask"] = [[1] * len(ids) for ids in columns["input_ids"]]
    dataset = Dataset.from_dict(columns)
    common = dict(output_dir=str(Path(result_path).parent / tool), num_train_epochs=1, learning_rate=spec["lr"],
                  weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8, max_grad_norm=1.0,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                  disable_tqdm=True, dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0,
                  use_cpu=True, bf16=False, gradient_checkpointing=False)
    if tool == "trl-packing":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, per_device_train_batch_size=spec["micro"], packing=True, packing_strategy="bfd",
                         max_length=spec["seq_len"])
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[StepClock()])
    else:
        flattening = tool == "trainer-flattening"
        per_step, micro = spec["examples_per_step"], spec["padded_micro"]
        args = TrainingArguments(**common, per_device_train_batch_size=per_step if flattening else micro,
                                 gradient_accumulation_steps=1 if flattening else per_step // micro)
        collator = DataCollatorWithFlattening() if flattening else DataCollatorForSeq2Seq(tokenizer)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[StepClock()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for step, loss in zip(steps, losses, strict=True):
        step["loss"] = loss
    Path(result_path).write_text(json.dumps({
        "steps": steps, "started_s": started, "optim": str(args.optim),
        "held_out_loss": held_out_loss(trainer.model, spec["held_out"])}))


def worker(tool: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    (finetrain_worker if tool in FINETRAIN_TRAIN else peer_worker)(tool, spec, result_path)


# ----------------------------------------------------------------------------- results


def summarize(measured: dict, warmup: int) -> dict:
    """Rates over the steps after the warm-up: from the end of step `warmup` to the end of the last."""
    steps = measured["steps"]
    if len(steps) <= warmup:
        raise RuntimeError(f"{len(steps)} steps ran, not more than --warmup {warmup}")
    timed, start = steps[warmup:], steps[warmup - 1]
    real = sum(s["real_tokens"] for s in timed)
    return {
        "tokens_per_s": real / (timed[-1]["end_s"] - start["end_s"]),
        "tokens_per_cpu_s": real / (timed[-1]["end_cpu_s"] - start["end_cpu_s"]),
        "peak_rss_mib": steps[-1]["rss_mib"],
        "final_loss": steps[-1]["loss"],
        "held_out_loss": measured["held_out_loss"]["all"],
        "held_out_loss_by_source": {k: v for k, v in measured["held_out_loss"].items() if k != "all"},
        "steps": len(steps),
        "real_tokens_per_step": sum(s["real_tokens"] for s in steps) / len(steps),
        "filled": sum(s["real_tokens"] for s in steps) / sum(s["slots"] for s in steps),
        "start_to_timed_s": start["end_s"] - measured["started_s"],
        **{key: measured[key] for key in ("compile", "optim") if key in measured},
        "losses": [s["loss"] for s in steps],
    }


def table(results: dict) -> str:
    base = results["finetrain"] if "finetrain" in results else None
    lines = ["| tool | tokens/s | vs finetrain | tokens per CPU-s | vs finetrain | peak RSS (MiB) | vs finetrain | "
             "final loss | held-out loss | chat | text |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(row, key):
        return f"{row[key] / base[key]:.2f}x" if base else "-"

    for tool, row in results.items():
        lines.append(f"| {TOOLS[tool]} | {row['tokens_per_s']:,.0f} | {ratio(row, 'tokens_per_s')} | "
                     f"{row['tokens_per_cpu_s']:,.0f} | {ratio(row, 'tokens_per_cpu_s')} | "
                     f"{row['peak_rss_mib']:,.0f} | {ratio(row, 'peak_rss_mib')} | "
                     f"{row['final_loss']:.4f} | {row['held_out_loss']:.4f} | "
                     f"{row['held_out_loss_by_source']['chat']:.4f} | {row['held_out_loss_by_source']['text']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-16m",
                        help="random-16m, or a model.path such as builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=30, help="finetrain's optimizer steps (the others: one epoch "
                                                             "over the same examples, about as many steps)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not timed (at least 1)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=2, help="packed rows per optimizer step (finetrain, TRL)")
    parser.add_argument("--padded-micro", type=int, default=4, help="examples per padded micro-batch (Trainer)")
    parser.add_argument("--lr", type=float, help="default: 1e-3 for random-16m, 5e-5 for a pretrained model")
    parser.add_argument("--held-out", type=int, default=16, help="examples of each source held out for the final loss")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per tool")
    parser.add_argument("--tools", nargs="*", choices=list(TOOLS), default=list(TOOLS))
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: timing starts at the end of a step")
    if args.lr is None:
        args.lr = 1e-3 if args.model == "random-16m" else 5e-5

    from transformers import AutoTokenizer

    machine_before = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model_folder(args.model, work)
        tokenizer = AutoTokenizer.from_pretrained(model)
        train, held_out = [], {}
        for source, examples in tokenized_examples(tokenizer, args.seq_len, work / "cache").items():
            every = math.ceil(len(examples) / args.held_out)
            held_out[source] = examples[::every]
            train += [e for i, e in enumerate(examples) if i % every]
        (work / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in train))
        configs = {tool: str(finetrain_config(work, tool, args, model)) for tool in FINETRAIN_TRAIN}
        order = finetrain_order(Path(configs["finetrain"]), tokenizer, args.steps, args.micro)
        per_step = max(args.padded_micro, round(len(order) / args.steps / args.padded_micro) * args.padded_micro)
        spec = {"model": str(model), "seq_len": args.seq_len, "micro": args.micro, "padded_micro": args.padded_micro,
                "examples_per_step": per_step, "lr": args.lr, "configs": configs,
                "train": [train[i] for i in order], "held_out": held_out}
        (work / "spec.json").write_text(json.dumps(spec))
        print(f"{len(train)} training examples, {sum(map(len, held_out.values()))} held out; "
              f"finetrain's {args.steps} steps take {len(order)} of them "
              f"({sum(len(e['input_ids']) for e in spec['train']):,} tokens); "
              f"Trainer: {per_step} examples per step", flush=True)

        results = {}
        for tool in args.tools:
            load_before = os.getloadavg()[0]
            measured = run_worker(__file__, [tool, str(work / "spec.json")], work / f"{tool}.json", args.threads)
            # other load on the machine while this tool ran: its wall-clock rate depends on it
            results[tool] = {**summarize(measured, args.warmup),
                             "load_average_1min": [load_before, os.getloadavg()[0]]}
            shown = {k: v for k, v in results[tool].items() if k != "losses"}
            print(f"{tool}: {json.dumps(shown)}", flush=True)

    print(table(results))
    import transformers
    import trl

    name = args.model.removeprefix("builtin:") if args.model == "random-16m" or args.model.startswith("builtin:") \
        else Path(args.model).name
    out = REPO / "bench" / "results" / f"vs_peers-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {**machine(), "load_average_before": machine_before["load_average"],
                    "transformers": transformers.__version__, "trl": trl.__version__},
        "settings": {**{k: v for k, v in vars(args).items() if k != "worker"},
                     "model_config": RANDOM_16M if args.model == "random-16m" else None,
                     "training_examples": len(order), "trainer_examples_per_step": per_step},
        "results": results}, indent=1))


if __name__ == "__main__":
    main()
