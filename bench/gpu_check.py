"""The CUDA path on one GPU, in one command (the CPU tests cannot reach it):

(a) flash_attention_2 keeps packed documents apart: SmolLM2-135M-Instruct in bf16, one row of
    several documents with `position_ids` restarting per document (and once more with transformers'
    `cu_seq_lens_q/k`, `max_length_q/k` kwargs, as finetrain's collator passes them) gives each
    document the logits it gets in a padded batch of the documents alone, within bf16 tolerance;
    a row run as one long document shows what a leak would look like.
(b) 30 optimizer steps of SmolLM2 full fine-tuning through `finetrain train`: bf16 compute,
    `train.compile=true`, the fused loss head (the default), packed rows of 2,048 tokens, on
    `parallel.strategy=single` and on `fsdp` with one rank.
(c) one long row (8,192 tokens) per step with activation checkpointing, with and without
    `train.activation_offload`: peak CUDA memory and step time.

    python bench/gpu_check.py [key=value ...]   # overrides for both runs, e.g. logging.peak_flops=...

Prints JSON (tokens/s, MFU and peak CUDA memory per run, after the first WARMUP steps) and
writes bench/results/gpu_check.json; exits 1 when (a) or a run fails, 2 where there is no CUDA GPU.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from harness import REPO, machine

MODEL = "builtin:smollm2-135m-instruct"
DOCUMENT_TOKENS = (300, 57, 600, 129)  # unequal lengths, so that no boundary falls on a round number
BF16_TOLERANCE = 0.05  # of the largest logit: bf16 keeps 8 bits of mantissa, through 30 layers
STEPS, WARMUP = 30, 5  # the first steps compile the layers and are not averaged


def packed_attention() -> dict:
    """(a): the largest logit difference of the packed row from the padded documents."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import cache_root
    from trainer.data.builtin import materialize
    from trainer.models import resolve_model_path

    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    stories = [tokenizer(json.loads(line)["text"])["input_ids"]
               for line in materialize("builtin:gensim-lee", cache_root()).read_text().splitlines()]
    # the longest stories (all four longer than 600 tokens), cut to the lengths wanted
    docs = [ids[:n] for ids, n in zip(sorted(stories, key=len, reverse=True), DOCUMENT_TOKENS)]
    lengths = [len(d) for d in docs]
    longest = max(lengths)

    def cuda(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, device="cuda")

    with torch.no_grad():
        padded = model(input_ids=cuda([d + [0] * (longest - len(d)) for d in docs]),
                       attention_mask=cuda([[1] * len(d) + [0] * (longest - len(d)) for d in docs]),
                       use_cache=False).logits.float()
        reference = torch.cat([padded[i, :n] for i, n in enumerate(lengths)])
        row = cuda([list(itertools.chain(*docs))])
        restarting = cuda([list(itertools.chain(*(range(n) for n in lengths)))])
        bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
        whole = torch.tensor([0, sum(lengths)], dtype=torch.int32, device="cuda")
        variants = {
            "position_ids": {"position_ids": restarting},
            "cu_seq_lens": {"position_ids": restarting, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
                            "max_length_q": longest, "max_length_k": longest},
            "one document (leaks)": {"position_ids": restarting, "cu_seq_lens_q": whole, "cu_seq_lens_k": whole,
                                     "max_length_q": sum(lengths), "max_length_k": sum(lengths)},
        }
        scale = reference.abs().max().item()
        differences = {name: (model(input_ids=row, use_cache=False, **kwargs).logits[0].float() - reference)
                       .abs().max().item() / scale for name, kwargs in variants.items()}
    isolated = {name: d for name, d in differences.items() if "leaks" not in name}
    return {"documents": lengths, "max_logit_difference_relative": differences, "tolerance": BF16_TOLERANCE,
            "passed": all(d <= BF16_TOLERANCE for d in isolated.values())}


def training_run(strategy: str, folder: Path, overrides: list[str]) -> dict:
    """(b): `finetrain train` on one rank; rates over the steps after the warm-up, from metrics.jsonl."""
    import yaml

    config = {
        "run": {"name": f"gpu-check-{strategy}", "output_dir": str(folder / strategy), "seed": 0},
        "model": {"path": MODEL},
        "data": {"seq_len": 2048, "datasets": [
            {"name": "chat", "path": "builtin:chatterbot", "format": "chat", "weight": 0.8},
            {"name": "lee", "path": "builtin:gensim-lee", "format": "text", "weight": 0.2}]},
        "parallel": {"strategy": strategy, "mixed_precision": "bf16"},
        "optim": {"lr": 2e-5, "warmup_steps": 3},
        "train": {"micro_batch_size": 8, "global_batch_size": 8, "max_steps": STEPS, "compile": True},
        "checkpoint": {"resume": "never"},
        "logging": {"progress_bar": False},
    }
    path = folder / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(path), "--nproc", "1", *overrides],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exited {proc.returncode}", "stderr": proc.stderr[-3000:]}
    records = [json.loads(line) for line in (folder / strategy / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    timed = [r for r in steps if r["step"] > WARMUP]
    seconds = sum(r["step_time_s"] for r in timed)
    return {
        "steps": len(steps),
        "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / seconds,
        "mfu": sum(r["mfu"] * r["step_time_s"] for r in timed) / seconds if "mfu" in timed[0] else None,
        "peak_allocated_gib": max(r["memory/max_allocated_gib"] for r in steps),
        "peak_reserved_gib": max(r["memory/max_reserved_gib"] for r in steps),
        "final_loss": steps[-1]["loss"],
        "compile": next((line for line in proc.stderr.splitlines() if "decoder layers compiled" in line), ""),
    }


LONG_ROW, LONG_STEPS = 8192, 8  # SmolLM2's longest position; the first WARMUP steps are not averaged


def long_row_with_and_without_offload(folder: Path, overrides: list[str]) -> dict:
    """(c): one row of LONG_ROW tokens per step, activation checkpointing on, with and without
    `train.activation_offload`: peak CUDA memory and step time of each (`finetrain train --nproc 1`)."""
    import yaml

    runs = {}
    for offload in (False, True):
        name = "offload" if offload else "on-device"
        config = {
            "run": {"name": f"gpu-check-long-{name}", "output_dir": str(folder / f"long-{name}"), "seed": 0},
            "model": {"path": MODEL},
            "data": {"seq_len": LONG_ROW, "datasets": [{"name": "lee", "path": "builtin:gensim-lee", "format": "text"}]},
            "parallel": {"strategy": "single", "mixed_precision": "bf16", "activation_checkpointing": True},
            "train": {"micro_batch_size": 1, "global_batch_size": 1, "max_steps": LONG_STEPS, "activation_offload": offload},
            "checkpoint": {"resume": "never"},
            "logging": {"progress_bar": False},
        }
        path = folder / f"long-{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(path), "--nproc", "1", *overrides],
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
        if proc.returncode != 0:
            runs[name] = {"error": f"exited {proc.returncode}", "stderr": proc.stderr[-3000:]}
            continue
        steps = [json.loads(line) for line in (folder / f"long-{name}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in steps if "step_time_s" in r]
        timed = [r["step_time_s"] for r in steps if r["step"] > WARMUP]
        runs[name] = {"seq_len": LONG_ROW, "step_time_s": sum(timed) / len(timed),
                      "peak_allocated_gib": max(r["memory/max_allocated_gib"] for r in steps),
                      "peak_reserved_gib": max(r["memory/max_reserved_gib"] for r in steps)}
    return runs


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU (torch.cuda.is_available() is false); run it on a machine with one",
              file=sys.stderr)
        return 2
    report = {"gpu": torch.cuda.get_device_name(), "machine": machine()}
    try:
        report["flash_attention_2"] = packed_attention()
    except (ImportError, ValueError) as err:  # flash-attn missing or unusable: transformers says which
        report["flash_attention_2"] = {"passed": False, "error": str(err).splitlines()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        report["training"] = {strategy: training_run(strategy, Path(tmp), sys.argv[1:])
                              for strategy in ("single", "fsdp")}
        report["long_row_activation_offload"] = long_row_with_and_without_offload(Path(tmp), sys.argv[1:])
    text = json.dumps(report, indent=1)
    print(text)
    out = REPO / "bench" / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    failed = not report["flash_attention_2"]["passed"] or any(
        "error" in run for run in (*report["training"].values(), *report["long_row_activation_offload"].values()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
