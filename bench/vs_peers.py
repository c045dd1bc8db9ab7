"""finetrain against its peers: one model, the same examples in the same order, the same optimizer,
through finetrain's own loop, transformers' `Trainer` (padding-free with `DataCollatorWithFlattening`,
and padded batches), and TRL's `SFTTrainer` (padding-free, and packed best-fit decreasing); CPU,
full fine-tuning in fp32 or with bf16 compute, one process per tool, run one after another.

Data: chatterbot's conversations (the assistant turns are the targets) and the news stories of
gensim's Lee corpus (every token a target), tokenized once with finetrain's encoders and the
model's tokenizer, cut to `--seq-len`, and fed to every tool as the same ids (finetrain's
`format: tokenized`: input_ids, labels with -100 = no target). `--held-out` examples of each
source are set aside for the final loss. Three sets are drawn from the rest (seeded):

- small: 48 examples, trained for `--small-epochs` epochs (a set too small to fill rows well);
- large: 2,000 examples, of which finetrain's first `--large-steps` steps consume some;
- long-tail: a few documents near `--seq-len` tokens (Lee stories joined and cut to 1 to 40 tokens
  short of it) among many short conversations, for `--long-tail-epochs` epochs.

finetrain shuffles and packs: the examples its steps consume, in the order it consumes them, are
every tool's training set, and each peer runs one epoch over exactly them (Trainer: sequential
sampler; TRL padding-free: no shuffle; TRL packing: best-fit decreasing reorders by length).
Tokens per optimizer step agree on average: finetrain and TRL packing take `--micro` rows of
`--seq-len` tokens, the others the number of examples finetrain's steps held on average (padded:
in micro-batches of `--padded-micro`, accumulated).

Everywhere: AdamW (betas 0.9/0.95, eps 1e-8, no weight decay; torch's fused kernel), constant
`--lr`, gradients clipped at 1.0, sdpa attention for the peers (finetrain: `model.attention:
auto`, which on a CPU takes packed rows through sdpa one document at a time), no activation
checkpointing, the loss the mean over the step's target tokens; bf16: autocast with fp32 master
weights (`parallel.mixed_precision: bf16`, the peers' `bf16=True`). finetrain runs with its
defaults plus `train.compile=true` (target-only fused head, compiled decoder layers).

    python bench/vs_peers.py [--model random-16m|builtin:smollm2-135m-instruct|PATH]
                             [--sets small large long-tail] [--dtypes fp32 bf16] [--tools ...]
                             [--threads 1] [--warmup 3] [--seq-len 1024] [--micro 2]

Per tool: real (non-padding) input tokens per second over the steps after `--warmup`, from the
end of one optimizer step to the end of the next (data, forward, backward, optimizer; the first
steps, compilation included, are not timed), and per CPU-second of the process (other load on
the machine does not inflate that); the padding share of the positions computed; MFU (model
FLOPs of the real tokens, 6 x parameters + attention per token as finetrain's metrics count
them, over the compute dtype's measured 1024^3 matmul peak on as many threads, by wall clock and
by CPU time); peak RSS (the worker's own VmHWM) at the end of the last step; the held-out loss
after training (each held-out example alone, eager, the same code for every tool). The load
average is recorded before and after each tool. Results accumulate in
bench/results/vs_peers-<model>.json (one entry per set, dtype and tool; a later run replaces the
entries it measures), and a markdown table with each tool's ratios to Trainer + flattening is
printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import yaml
from harness import RANDOM_16M, REPO, machine, matmul_peak, run_worker, step_end, train_finetrain

TOOLS = {
    "finetrain": "finetrain (fused head + compiled layers)",
    "trainer-flattening": "Trainer + DataCollatorWithFlattening",
    "trl-padding-free": "TRL SFTTrainer, padding_free",
    "trl-packing": "TRL SFTTrainer, packing bfd",
    "trainer-padded": "Trainer, padded (DataCollatorForSeq2Seq)",
}
BASELINE = "trainer-flattening"
SETS = ("small", "large", "long-tail")
SMALL_EXAMPLES, LARGE_EXAMPLES = 48, 2000
LONG_DOCUMENTS, LONG_TAIL_SHORT = 4, 196
BETAS = (0.9, 0.95)  # finetrain's default; the peers are given the same
IGNORE = -100


# ----------------------------------------------------------------------------- set-up (parent)


def model_folder(model: str, work: Path) -> Path:
    """The Hugging Face folder every tool loads: the random 16M Llama (seeded, with SmolLM2's
    tokenizer) written once, or a model.path (`builtin:` ones are converted once by finetrain)."""
    from trainer.model.loading import resolve_model_path

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


def tokenized_examples(tokenizer, cache: Path) -> dict[str, list[dict]]:
    """Chatterbot conversations ("chat") and Lee stories ("text") as input_ids + labels, whole."""
    from trainer.data.builtin import materialize
    from trainer.data.formats import build_encoder
    from trainer.data.records import field_names

    sources = {}
    for source, fmt in (("builtin:chatterbot", "chat"), ("builtin:gensim-lee", "text")):
        examples = sources[fmt] = []
        encoder = build_encoder(fmt, tokenizer, field_names(fmt, {}, source), train_on_prompt=False)
        for line in materialize(source, cache).read_text().splitlines():
            encoded = encoder.encode(json.loads(line))
            ids = [int(t) for t in encoded.tokens]
            examples.append({"input_ids": ids, "labels": [t if target else IGNORE
                                                           for t, target in zip(ids, encoded.targets)]})
    return sources


def cut(example: dict, length: int) -> dict | None:
    """The example's first `length` tokens, or None when no target is left after the first."""
    ids, labels = example["input_ids"][:length], example["labels"][:length]
    return {"input_ids": ids, "labels": labels} if any(label != IGNORE for label in labels[1:]) else None


def build_sets(sources: dict[str, list[dict]], seq_len: int, held_out: int) -> tuple[dict, dict]:
    """(the three training sets, the held-out examples of each source)."""
    rng = random.Random(0)
    held, rest = {}, {}
    for name, examples in sources.items():
        every = math.ceil(len(examples) / held_out)
        held[name] = [e for e in (cut(x, seq_len) for x in examples[::every]) if e]
        rest[name] = [x for i, x in enumerate(examples) if i % every]
    pool = [e for e in (cut(x, seq_len) for x in rest["chat"] + rest["text"]) if e]
    rng.shuffle(pool)
    stories = list(rest["text"])
    rng.shuffle(stories)
    long, joined = [], {"input_ids": [], "labels": []}
    for story in stories:  # Lee stories joined until a document reaches the row length
        joined = {k: joined[k] + story[k] for k in joined}
        if len(joined["input_ids"]) >= seq_len:
            long.append(cut(joined, seq_len - (0, 9, 24, 40)[len(long) % 4]))
            joined = {"input_ids": [], "labels": []}
            if len(long) == LONG_DOCUMENTS:
                break
    short = [e for e in (cut(x, seq_len) for x in rest["chat"]) if e]
    tail = long + rng.sample(short, LONG_TAIL_SHORT)
    rng.shuffle(tail)
    return {"small": pool[:SMALL_EXAMPLES], "large": pool[:LARGE_EXAMPLES], "long-tail": tail}, held


def finetrain_config(work: Path, args, model: Path, dtype: str, length: dict) -> Path:
    cfg = {
        "run": {"name": "finetrain", "output_dir": str(work / "finetrain"), "seed": 0},
        "model": {"path": str(model)},
        "data": {"seq_len": args.seq_len, "cache_dir": str(work / "cache"),
                 "datasets": [{"name": "set", "path": str(work / "train.jsonl"), "format": "tokenized"}]},
        "parallel": {"mixed_precision": dtype},
        "optim": {"lr": args.lr, "weight_decay": 0.0, "betas": list(BETAS), "scheduler": "constant"},
        "train": {"micro_batch_size": args.micro, "global_batch_size": args.micro, "compile": True, **length},
        "checkpoint": {"resume": "never"},
        "logging": {"progress_bar": False},
    }
    path = work / "finetrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def finetrain_order(config: Path, tokenizer) -> tuple[list[int], int]:
    """The examples (line numbers of train.jsonl) that finetrain's steps consume, in order, and
    the number of its steps: its own loader, run without a model."""
    from trainer.config.schema import load_config
    from trainer.data.loader import build_train_loader
    from trainer.loop import total_steps

    cfg = load_config(config)
    loader = build_train_loader(cfg, tokenizer, "sdpa_varlen", rank=0, world_size=1)
    steps = total_steps(cfg, loader)
    order = [piece.example for _ in range(steps * cfg.train.micro_batch_size) for piece in loader.stream.next_row()
             if piece.first]
    return order, steps


# ----------------------------------------------------------------------------- workers


def held_out_loss(model, sets: dict[str, list[dict]]) -> dict[str, float]:
    """Mean cross-entropy per target token of each set of held-out examples and of all of them,
    each example run alone (no padding, no packing), eager, fp32 and without gradients: the same
    numbers whichever tool trained the model."""
    import torch
    import torch.nn.functional as F

    sums = {}
    model.eval()
    model.float()
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
    run, measured = train_finetrain(spec["config"])
    model = run.strategy.unwrapped_model()
    records = [json.loads(line) for line in (run.cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait_s"] for r in records if "data_wait_s" in r]
    Path(result_path).write_text(json.dumps({
        **measured, "started_s": started, "held_out_loss": held_out_loss(model, spec["held_out"]),
        "data_wait_s": {"first_step": waits[0], "later_steps_max": max(waits[1:], default=None),
                        "later_steps_median": sorted(waits[1:])[len(waits[1:]) // 2] if waits[1:] else None}}))


def peer_worker(tool: str, spec: dict, result_path: str) -> None:
    started = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening,
                              Trainer, TrainerCallback, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.padding_side = "right"  # positions count from the first token, as in training without padding
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    # transformers keeps flattened documents apart through their restarting position_ids only
    # when no KV cache is built (with one, every token attends to every earlier one in the row).
    model.config.use_cache = False
    parameters = sum(p.numel() for p in model.parameters())

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
    bf16 = spec["dtype"] == "bf16"
    common = dict(output_dir=str(Path(result_path).parent / tool), num_train_epochs=1, learning_rate=spec["lr"],
                  weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8, max_grad_norm=1.0,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                  disable_tqdm=True, dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0,
                  use_cpu=True, bf16=bf16, gradient_checkpointing=False)
    per_step, micro = spec["examples_per_step"], spec["padded_micro"]
    if tool.startswith("trl"):
        from trl import SFTConfig, SFTTrainer

        if tool == "trl-packing":
            args = SFTConfig(**common, per_device_train_batch_size=spec["micro"], packing=True,
                             packing_strategy="bfd", max_length=spec["seq_len"])
        else:  # the examples are cut to seq_len already; padding-free without packing enforces no length
            args = SFTConfig(**common, per_device_train_batch_size=per_step, padding_free=True, max_length=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[StepClock()])
    else:
        flattening = tool == "trainer-flattening"
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
        "steps": steps, "started_s": started, "optim": str(args.optim), "parameters": parameters,
        "held_out_loss": held_out_loss(trainer.model, spec["held_out"])}))


def worker(tool: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    (finetrain_worker if tool == "finetrain" else peer_worker)(tool, spec, result_path)


# ----------------------------------------------------------------------------- results


def summarize(measured: dict, warmup: int, flops_per_token: float, peak: dict) -> dict:
    """Rates over the steps after the warm-up: from the end of step `warmup` to the end of the last."""
    steps = measured["steps"]
    if len(steps) <= warmup:
        raise RuntimeError(f"{len(steps)} steps ran, not more than --warmup {warmup}")
    timed, start = steps[warmup:], steps[warmup - 1]
    real = sum(s["real_tokens"] for s in timed)
    slots = sum(s["slots"] for s in timed)
    wall, cpu = timed[-1]["end_s"] - start["end_s"], timed[-1]["end_cpu_s"] - start["end_cpu_s"]
    return {
        "tokens_per_s": real / wall,
        "tokens_per_cpu_s": real / cpu,
        "padding_fraction": 1 - real / slots,
        "mfu": flops_per_token * real / wall / peak["flops_per_s"],
        "mfu_per_cpu_s": flops_per_token * real / cpu / peak["flops_per_cpu_s"],
        "peak_rss_mib": steps[-1]["rss_mib"],
        "held_out_loss": measured["held_out_loss"]["all"],
        "held_out_loss_by_source": {k: v for k, v in measured["held_out_loss"].items() if k != "all"},
        "steps": len(steps),
        "timed_steps": len(timed),
        "real_tokens_per_step": sum(s["real_tokens"] for s in steps) / len(steps),
        "start_to_timed_s": start["end_s"] - measured["started_s"],
        "parameters": measured["parameters"],
        **{key: measured[key] for key in ("compile", "optim", "attention", "data_wait_s") if key in measured},
        "losses": [s["loss"] for s in steps],
    }


def table(results: dict) -> str:
    """One markdown table: every set, dtype and tool, with ratios to Trainer + flattening."""
    lines = ["| set | dtype | tool | tokens/s | per CPU-s | vs flattening (CPU-s) | padding | MFU | MFU per CPU-s "
             "| peak RSS (MiB) | vs flattening | held-out loss |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for set_name, by_dtype in results.items():
        for dtype, by_tool in by_dtype.items():
            base = by_tool.get(BASELINE)
            for tool, row in by_tool.items():
                if "error" in row:
                    lines.append(f"| {set_name} | {dtype} | {TOOLS[tool]} | failed: {row['error'][:80]} |")
                    continue

                def ratio(key):
                    return f"{row[key] / base[key]:.2f}x" if base and "error" not in base else "-"

                lines.append(f"| {set_name} | {dtype} | {TOOLS[tool]} | {row['tokens_per_s']:,.0f} | "
                             f"{row['tokens_per_cpu_s']:,.0f} | {ratio('tokens_per_cpu_s')} | "
                             f"{100 * row['padding_fraction']:.1f} % | {row['mfu']:.3f} | {row['mfu_per_cpu_s']:.3f} | "
                             f"{row['peak_rss_mib']:,.0f} | {ratio('peak_rss_mib')} | {row['held_out_loss']:.4f} |")
    return "\n".join(lines)


def run_set(set_name: str, dtype: str, examples: list[dict], held_out: dict, args, model: Path, tokenizer,
            work: Path, peaks: dict) -> dict:
    """Every tool on one set in one dtype."""
    from transformers import AutoConfig

    from trainer.reporting.metrics_log import flops_per_token

    folder = work / f"{set_name}-{dtype}"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    length = {"large": {"max_steps": args.large_steps}, "small": {"epochs": args.small_epochs},
              "long-tail": {"epochs": args.long_tail_epochs}}[set_name]
    config = finetrain_config(folder, args, model, dtype, length)
    order, steps = finetrain_order(config, tokenizer)
    per_step = max(args.padded_micro, round(len(order) / steps / args.padded_micro) * args.padded_micro)
    spec = {"model": str(model), "seq_len": args.seq_len, "micro": args.micro, "padded_micro": args.padded_micro,
            "examples_per_step": per_step, "lr": args.lr, "dtype": dtype, "config": str(config),
            "train": [examples[i] for i in order], "held_out": held_out}
    (folder / "spec.json").write_text(json.dumps(spec))
    tokens = sum(len(e["input_ids"]) for e in spec["train"])
    print(f"{set_name} {dtype}: {len(examples)} examples in the set; finetrain's {steps} steps take {len(order)} "
          f"({tokens:,} tokens); Trainer: {per_step} examples per step", flush=True)
    model_config = AutoConfig.from_pretrained(model)
    results = {}
    for tool in args.tools:
        load_before = os.getloadavg()
        try:
            measured = run_worker(__file__, [tool, str(folder / "spec.json")], folder / f"{tool}.json", args.threads)
        except RuntimeError as err:
            results[tool] = {"error": str(err).splitlines()[0], "stderr": str(err)[-2000:]}
            print(f"{set_name} {dtype} {tool}: FAILED {str(err)[-2000:]}", flush=True)
            continue
        per_token = flops_per_token(model_config, measured["parameters"], args.seq_len)
        results[tool] = {**summarize(measured, args.warmup, per_token, peaks[dtype]),
                         "load_average": {"before": [round(x, 2) for x in load_before],
                                          "after": [round(x, 2) for x in os.getloadavg()]},
                         "set_examples": len(examples), "trained_examples": len(order), "trained_tokens": tokens,
                         "finetrain_steps": steps, "examples_per_step": per_step}
        shown = {k: v for k, v in results[tool].items() if k != "losses"}
        print(f"{set_name} {dtype} {tool}: {json.dumps(shown)}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-16m",
                        help="random-16m, or a model.path such as builtin:smollm2-135m-instruct")
    parser.add_argument("--sets", nargs="*", choices=SETS, default=list(SETS))
    parser.add_argument("--dtypes", nargs="*", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--tools", nargs="*", choices=list(TOOLS), default=list(TOOLS)[:3])
    parser.add_argument("--large-steps", type=int, help="finetrain's steps on the large set (default: 30 on "
                                                        "random-16m, 10 on a pretrained model)")
    parser.add_argument("--small-epochs", type=int, default=4)
    parser.add_argument("--long-tail-epochs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="first steps not timed (at least 1)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=2, help="packed rows per optimizer step (finetrain, TRL)")
    parser.add_argument("--padded-micro", type=int, default=4, help="examples per padded micro-batch (Trainer)")
    parser.add_argument("--lr", type=float, help="default: 1e-3 for random-16m, 5e-5 for a pretrained model")
    parser.add_argument("--held-out", type=int, default=16, help="examples of each source held out for the final loss")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per tool")
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: timing starts at the end of a step")
    pretrained = args.model != "random-16m"
    args.lr = args.lr or (5e-5 if pretrained else 1e-3)
    args.large_steps = args.large_steps or (10 if pretrained else 30)

    from transformers import AutoTokenizer

    name = args.model.removeprefix("builtin:") if not pretrained or args.model.startswith("builtin:") \
        else Path(args.model).name
    out = REPO / "bench" / "results" / f"vs_peers-{name}.json"
    report = json.loads(out.read_text()) if out.is_file() else {}
    if "sets" not in report:  # a file of the earlier layout
        report = {"sets": {}}
    peaks = {dtype: matmul_peak(dtype, args.threads) for dtype in args.dtypes}
    report["matmul_peak"] = {**report.get("matmul_peak", {}), **peaks}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model_folder(args.model, work)
        tokenizer = AutoTokenizer.from_pretrained(model)
        sets, held_out = build_sets(tokenized_examples(tokenizer, work / "cache"), args.seq_len, args.held_out)
        for set_name in args.sets:
            for dtype in args.dtypes:
                results = run_set(set_name, dtype, sets[set_name], held_out, args, model, tokenizer, work, peaks)
                entry = report["sets"].setdefault(set_name, {}).setdefault(dtype, {})
                entry.update(results)
                import transformers
                import trl

                report["machine"] = {**machine(), "transformers": transformers.__version__, "trl": trl.__version__}
                report["settings"] = {**{k: v for k, v in vars(args).items() if k not in ("worker", "sets", "dtypes",
                                                                                          "tools")},
                                      "model_config": RANDOM_16M if args.model == "random-16m" else None}
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=1))
    print(table({s: {d: report["sets"][s][d] for d in args.dtypes} for s in args.sets}))


if __name__ == "__main__":
    main()
