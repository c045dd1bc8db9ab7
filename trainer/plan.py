"""The run plan: everything a run decides once, from the config and the world it runs on.

`plan_run(cfg, world_size, device_type)` resolves the strategy (`auto` included) and its
mesh, the gradient accumulation, the master and compute dtypes, the attention backend, the
primary (task) data set and the checkpoint format, and checks every rule
that relates several keys: those of the model, the data and the batch layout here, those of
a strategy as the strategy declares them (trainer/parallel/). It raises one `ConfigError`
listing every problem. `finetrain train` calls it before any rank starts, with the world it
is about to launch, and every rank calls it again with its own: the command refuses exactly
what a rank would.

`resume_changes` compares a checkpoint's config with the one resuming it: each changed key
either takes effect (listed once at start-up) or, if the run cannot continue with it, is
refused by name.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from trainer.checkpoint.run_folder import config_problems as run_folder_problems
from trainer.config.plan_types import Mesh, RunPlan
from trainer.config.schema import Config, dataset_name, flatten, to_dict
from trainer.data.eval_sets import eval_config_problems, format_problems
from trainer.data.formats import train_on_problems
from trainer.data.mixing import primary_index
from trainer.model.attention import (MASKED_ATTENTION, SDPA_VARLEN, SEQUENCE_PARALLEL_ATTENTION, TORCH_VARLEN,
                                     VARLEN_ATTENTION, torch_varlen_problem)
from trainer.model.loading import dropout_problems, hub_problems, model_config
from trainer.parallel.registry import resolve_strategy, strategy_class, strategy_problems
from trainer.peft.methods import is_prompt_learning, peft_config_problems
from trainer.preference.rules import preference_problems
from trainer.reporting.metrics_log import tracker_problems
from trainer.runtime.errors import ConfigError
from trainer.runtime.precision import compute_dtype, compute_precision


def plan_run(cfg: Config, world_size: int, device_type: str) -> RunPlan:
    """The plan of `cfg` on `world_size` ranks of `device_type` ("cuda" or "cpu"); raises a
    ConfigError naming every key that cannot work together."""
    strategy = resolve_strategy(cfg, world_size)
    problems = [*model_problems(cfg), *peft_config_problems(cfg), *data_problems(cfg), *eval_config_problems(cfg),
                *preference_problems(cfg), *run_folder_problems(cfg), *tracker_problems(cfg),
                *strategy_problems(cfg, strategy, world_size)]
    attention = None
    try:
        attention = resolve_attention(cfg, device_type)
    except ConfigError as err:
        problems.append(str(err))
    sequence = sequence_problems(cfg, world_size, attention)
    mesh = Mesh(replicate=cfg.parallel.replicate, shard=max(1, world_size // cfg.parallel.replicate),
                sequence=cfg.parallel.sequence_parallel)
    accumulation, batch_problem = _accumulation(cfg, mesh.data_parallel) if not sequence else (1, [])
    problems += sequence + batch_problem
    if problems:
        raise ConfigError("\n".join(problems))
    names = [dataset_name(ds) for ds in cfg.data.datasets]
    primary = primary_index([ds.weight for ds in cfg.data.datasets])
    master = getattr(torch, cfg.model.dtype)
    return RunPlan(
        strategy=strategy, world_size=world_size, mesh=mesh, accumulation=accumulation, master_dtype=master,
        compute_dtype=compute_dtype(cfg.parallel.mixed_precision, cfg.model.dtype, device_type), attention=attention,
        primary_dataset=names[primary],
        checkpoint_format=strategy_class(strategy).checkpoint_format)


def resolve_attention(cfg: Config, device_type: str) -> str:
    """The attention backend to build the model with. `auto` takes a FlashAttention varlen
    kernel where one can run: on CUDA with 16-bit compute (the kernels have no fp32), the
    flash_attn package's (flash_attention_2) when installed, else the kernels inside torch
    (torch_varlen; FA3 on Hopper where torch offers it). Elsewhere (a CPU, fp32 compute) packed
    rows go through sdpa one document at a time (sdpa_varlen): like the FlashAttention kernels it
    computes no position outside a document, where sdpa with a block mask over whole rows computes
    them all. Unpacked rows (and classification) take sdpa with its padding mask there."""
    flash_attn = importlib.util.find_spec("flash_attn") is not None
    half = compute_precision(cfg.parallel.mixed_precision, cfg.model.dtype, device_type)[0] == "bf16"
    wanted = cfg.model.attention
    if wanted == "auto":
        if device_type == "cuda" and half:
            if flash_attn:
                return "flash_attention_2"
            if torch_varlen_problem(device_type) is None:
                return TORCH_VARLEN
        return SDPA_VARLEN if cfg.data.packing and cfg.model.task == "causal_lm" else "sdpa"
    if wanted == "flash_attention_2" and not (device_type == "cuda" and flash_attn):
        missing = [what for what, ok in (("a CUDA device", device_type == "cuda"), ("the flash_attn package", flash_attn))
                   if not ok]
        raise ConfigError(f"model.attention: flash_attention_2 needs {' and '.join(missing)} (this process runs on "
                          f"{device_type}); use model.attention=auto or sdpa (or torch_varlen on a CUDA GPU: "
                          "FlashAttention inside torch, nothing to build)")
    if wanted == TORCH_VARLEN:
        problem = torch_varlen_problem(device_type)
        if problem:
            raise ConfigError(f"model.attention: torch_varlen cannot run here: {problem}; use model.attention=auto, "
                              "sdpa or varlen_reference (its reference computation, on any device)")
    if cfg.data.packing and cfg.model.task == "causal_lm" and wanted not in VARLEN_ATTENTION + MASKED_ATTENTION:
        raise ConfigError(f"data.packing: attention {wanted!r} has no document-isolated packed path; use one of "
                          f"{', '.join(VARLEN_ATTENTION + MASKED_ATTENTION)}, or data.packing=false")
    return wanted


def sequence_problems(cfg: Config, world_size: int, attention: str | None) -> list[str]:
    """What `parallel.sequence_parallel` N needs: sequence groups of N ranks that divide the world (and,
    with HSDP, each shard group), rows and attention heads that split N ways, and a model whose rows
    can be cut: a causal LM whose packed documents the sharded attention can isolate."""
    n, key = cfg.parallel.sequence_parallel, "parallel.sequence_parallel"
    if n == 1:
        return []
    problems = []
    shard_group = world_size // cfg.parallel.replicate
    if world_size % n:
        problems.append(f"{key}: {n} ranks per sequence group do not divide the world of {world_size} ranks")
    elif cfg.parallel.replicate > 1 and shard_group % n:
        problems.append(f"{key}: {n} ranks per sequence group do not divide the shard groups of {shard_group} ranks "
                        f"(parallel.replicate {cfg.parallel.replicate})")
    if cfg.data.seq_len % n:
        problems.append(f"data.seq_len: {cfg.data.seq_len} tokens per row do not split over {key} {n} ranks; "
                        f"use a multiple of {n}")
    if cfg.model.task != "causal_lm":
        problems.append(f"{key}: model.task {cfg.model.task} needs each row whole on one rank (an encoder attends "
                        "both ways and the label belongs to the whole row); set parallel.sequence_parallel=1")
        return problems
    if is_prompt_learning(cfg.peft.method):
        problems.append(f"{key}: peft.method {cfg.peft.method} feeds virtual tokens to every row, which the "
                        "sharded rows cannot place; use lora, dora or ia3, or parallel.sequence_parallel=1")
    if attention is not None and attention not in SEQUENCE_PARALLEL_ATTENTION:
        problems.append(f"{key}: attention {attention!r} needs a seq_len^2 mask on every rank; use "
                        f"model.attention={' or '.join(SEQUENCE_PARALLEL_ATTENTION)}")
    try:

        config = model_config(cfg).get_text_config()
    except ConfigError as err:
        return problems + [str(err)]
    heads = getattr(config, "num_attention_heads", None) or 0
    counts = {"attention heads": heads, "key-value heads": getattr(config, "num_key_value_heads", None) or heads}
    uneven = {what: count for what, count in counts.items() if count % n}
    if uneven:
        common = math.gcd(*counts.values())
        problems.append(f"{key}: the model's {' and '.join(f'{c} {w}' for w, c in uneven.items())} do not split over "
                        f"{n} ranks (each rank attends with 1/{n} of them); use a divisor of {common}")
    return problems


def _accumulation(cfg: Config, data_parallel: int) -> tuple[int, list[str]]:
    t = cfg.train
    problems = []
    if t.global_batch_size % t.micro_batch_size:
        problems.append(f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                        f"train.micro_batch_size {t.micro_batch_size}")
    elif t.global_batch_size % (t.micro_batch_size * data_parallel):
        rows_per_pass = t.micro_batch_size * data_parallel
        ranks = f"{data_parallel} ranks" if cfg.parallel.sequence_parallel == 1 else \
            f"{data_parallel} data-parallel ranks (the world over parallel.sequence_parallel)"
        problems.append(f"train.global_batch_size: {t.global_batch_size} rows per step do not split into micro-batches "
                        f"of {t.micro_batch_size} on {ranks}; use a multiple of {rows_per_pass}")
    if (t.max_steps is None) == (t.epochs is None):
        problems.append("train: set exactly one of train.max_steps and train.epochs")
    return max(1, t.global_batch_size // (t.micro_batch_size * data_parallel)), problems


def model_problems(cfg: Config) -> list[str]:
    m, problems = cfg.model, []
    if (m.path is None) == (m.config is None):
        problems.append("model: set model.path (a Hugging Face folder or hub id) or model.config (random init)"
                        if m.path is None else "model: set only one of model.path and model.config")
    if m.tokenizer is None and m.path is None:
        problems.append("model.tokenizer: required with model.config (a tokenizer folder, or train-bpe)")
    if m.tokenizer == "train-bpe" and "vocab_size" not in (m.config or {}):
        problems.append("model.tokenizer: train-bpe needs model.config.vocab_size")
    problems += hub_problems(cfg) + dropout_problems(cfg)
    if m.dtype == "bfloat16" and cfg.parallel.mixed_precision == "fp32":
        problems.append("model.dtype: bfloat16 master weights cannot compute in parallel.mixed_precision fp32")
    if m.quantization != "none":
        if m.config is not None:
            problems.append(f"model.quantization: {m.quantization} quantizes pretrained weights as they load; set "
                            "model.path (model.config is a random init, which has nothing to quantize)")
        if cfg.peft.method == "none":
            problems.append(f"model.quantization: {m.quantization} freezes the base in 4-bit, which cannot be "
                            "trained; set peft.method (lora, qlora's usual one, or another adapter method)")
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"model.quantization: {m.quantization} needs the bitsandbytes package "
                            "(pip install 'finetrain[qlora]')")
    return problems


def data_problems(cfg: Config) -> list[str]:
    d, task, problems = cfg.data, cfg.model.task, []
    if not d.datasets:
        problems.append("data.datasets: at least one dataset is required")
    seen = set()
    for i, ds in enumerate(d.datasets):
        key = f"data.datasets.{i}"
        if not ds.path:
            problems.append(f"{key}.path: required")
        name = dataset_name(ds)
        if name in seen:
            problems.append(f"{key}.name: {name!r} is used twice (names key the metrics)")
        seen.add(name)
        problems += format_problems(cfg, f"{key}.format", ds.format)
        problems += train_on_problems(ds.format, ds.train_on, f"{key}.train_on")
    if d.packing and task == "sequence_classification":
        problems.append("data.packing: not available for sequence_classification (one label per row); "
                        "set data.packing=false")
    return problems


# ----------------------------------------------------------------------------- resume

# Keys that decide what a checkpoint holds or which examples it has seen: a run cannot continue
# from it with other values. Every other key takes effect from the first resumed step.
FIXED_ON_RESUME = (
    "run.seed", "model.config", "model.dtype", "model.quantization", "model.task", "model.num_labels",
    "model.chat_template", "peft",
    "data.seq_len", "data.packing", "data.train_on_prompt", "data.mix_by", "data.overlong", "data.on_bad_row",
    "data.datasets", "data.eval.fraction", "data.eval.max_examples", "data.eval.path", "data.eval.fields",
)


def resume_changes(saved: Config, current: Config) -> list[str]:
    """The keys whose values differ between a checkpoint's config and this run's, as
    `key: old -> new` lines (they take effect); raises ConfigError naming those that cannot."""
    before, after = flatten(to_dict(saved)), flatten(to_dict(current))
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    refused, applied = [], []
    for key in changed:
        line = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        # Where a data file lives may change (a run moved to a cluster) as long as it holds the same data.
        fixed = any(key == f or key.startswith(f + ".") for f in FIXED_ON_RESUME) and not key.endswith(".path")
        (refused if fixed else applied).append(line)
    if refused:
        raise ConfigError("\n".join(f"{line} differs from the checkpoint's config, and the run cannot continue with "
                                    "it (resume with the checkpoint's value, or start afresh with "
                                    "checkpoint.resume=never)" for line in refused))
    return applied

