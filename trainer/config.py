"""The config tree: dataclasses, YAML loading, dotted overrides and validation.

Everything a run can be told lives here, with its default. `load_config` is the
single entry point: it reads the YAML, applies `key=value` overrides, checks
every key, type and value, and raises `ConfigError` (one line per problem,
naming the key) before any process group, model or file is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import keyword
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from trainer.errors import ConfigError
from trainer.run_folder import config_problems as run_folder_problems


@dataclass
class RunConfig:
    name: str = "finetrain"
    output_dir: str = "runs/finetrain"
    seed: int = 0
    # A fresh run (checkpoint.resume: never) into a folder that holds an earlier run replaces
    # it (trainer/run_folder.py); without this key it is refused.
    overwrite: bool = False


@dataclass
class ModelConfig:
    # A local Hugging Face folder; or `config`, a transformers config dict for a
    # seeded random init (tests, debugging).
    path: Optional[str] = None
    config: Optional[dict] = None
    # A tokenizer folder (default: `path`), or "train-bpe": a byte-level BPE trained
    # in-process on the training data with the vocab size of `config`.
    tokenizer: Optional[str] = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    # nf4 (QLoRA): the linear layers of the pretrained base are quantized to 4-bit NormalFloat
    # by bitsandbytes as they load, and stay frozen; the adapter, embeddings, norms and head keep `dtype`.
    quantization: Literal["none", "nf4"] = "none"
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager", "varlen_reference"] = "auto"
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    num_labels: int = 2


@dataclass
class PeftConfig:
    method: Literal["none", "lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"] = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names, or "all-linear" (every linear layer but the output head).
    target_modules: Union[str, list] = "all-linear"
    num_virtual_tokens: int = 16  # prompt and prefix tuning


@dataclass
class DatasetConfig:
    name: str = ""
    path: str = ""
    format: Literal["chat", "instruction", "text", "classification", "tokenized"] = "chat"
    weight: float = 1.0
    # Maps finetrain's field names to the file's, e.g. {messages: conversations,
    # role: from, content: value} for sharegpt or {prompt: instruction, input: input,
    # response: output} for alpaca.
    fields: dict = field(default_factory=dict)


@dataclass
class EvalDataConfig:
    # Held-out data: a file (evaluated as one extra dataset named "eval"), or a
    # fraction of each training dataset set aside (evaluated per dataset).
    path: Optional[str] = None
    format: Literal["chat", "instruction", "text", "classification", "tokenized"] = "chat"
    fraction: float = 0.0
    max_examples: int = 512
    # Held-out prompts of each chat/instruction eval set answered greedily at every
    # eval, scored with ROUGE-L, exact match and token F1 (0: no generation).
    generate: int = 0
    max_new_tokens: int = 64


@dataclass
class DataConfig:
    seq_len: int = 2048
    packing: bool = True
    train_on_prompt: bool = False
    datasets: list = field(default_factory=list)  # list[DatasetConfig]
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)
    mix_by: Literal["examples", "tokens"] = "examples"
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    on_bad_row: Literal["error", "skip"] = "error"
    cache_dir: Optional[str] = None  # finetrain's cache (see cache_root); default: $FINETRAIN_CACHE or ~/.cache/finetrain


@dataclass
class ParallelConfig:
    strategy: Literal["auto", "single", "ddp", "fsdp", "zero1", "zero2", "zero3"] = "auto"
    offload: Literal["none", "optimizer", "params"] = "none"
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True  # fsdp: ZeRO-3 style; False keeps params gathered (ZeRO-2 style)
    # fsdp: HSDP, parameters sharded within groups of world/replicate ranks (a node, say) and
    # replicated across the `replicate` groups, so all-gathers stay inside a group.
    replicate: int = 1
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON whose keys override the generated ones


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear decay to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8  # rows per optimizer step, all ranks and accumulation steps
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end (and at step 0, the baseline of loss_change)
    save_every: int = 0  # 0: save only at the end (and on a stop signal)
    # LM head + cross-entropy on target positions only, in chunks: no [tokens, vocab] logits
    # (trainer/fused_loss.py); false computes the full logits.
    fused_loss: bool = True
    compile: bool = False  # torch.compile each decoder layer (trainer/compile.py)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"  # relative to run.output_dir
    keep_last: int = 2
    resume: str = "auto"  # auto | never | PATH
    # key `async`: DCP's async_save writes in the background while training goes on; the
    # checkpoint is sealed (COMPLETE, final name) only once every rank's write has finished.
    async_: bool = False


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "finetrain"
    entity: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    jsonl: bool = True
    progress_bar: bool = True
    # Nats of eval loss rise over step 0 on a rehearsal set (any training dataset but
    # the one with the largest weight) that log a forgetting warning, once per set; null: never.
    forgetting_warn: Optional[float] = 0.1
    # Peak FLOP/s of one device for MFU; default: a table of GPUs, on CPUs a matmul
    # measured once and cached.
    peak_flops: Optional[float] = None


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 60
    cpus_per_task: int = 8
    mem_gb: int = 0  # 0: the partition's default
    max_requeues: int = 10
    signal_delay_s: int = 120


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / self.checkpoint.dir


# Which list-valued keys hold dataclasses.
_LIST_ITEM_TYPES = {("data", "datasets"): DatasetConfig}


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """Read YAML at `path`, apply `key=value` overrides, validate; raise ConfigError."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run, model, data, ...)")
    for item in overrides:
        _apply_override(raw, item)
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors)
    try:
        errors.extend(validate(cfg, check_files=check_files))
    except (TypeError, ValueError, AttributeError):
        if not errors:  # range checks only trip over values already reported as mistyped
            raise
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-5)")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    return key, yaml.safe_load(value) if value.strip() else None


def _apply_override(raw: dict, item: str) -> None:
    key, value = parse_override(item)
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_index(node, part, ".".join(parts[: depth + 1]))
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
        node = child
    if isinstance(node, list):
        idx = _list_index(node, parts[-1], key)
        node[idx] = value
    else:
        node[parts[-1]] = value


def _list_index(node: list, part: str, key: str):
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key {key}: {part!r} is not an index of a list of {len(node)}")
    return node[int(part)] if isinstance(node[int(part)], (dict, list)) else int(part)


def _build(cls, raw: Any, prefix: str, errors: list[str]):
    """Turn a nested dict into the dataclass `cls`, collecting errors rather than stopping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {_key(f.name): f.name for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            errors.append(f"unknown key {full}{hint}")
            continue
        kwargs[fields[key]] = _coerce(hints[fields[key]], value, full, errors, tuple(full.split(".")))
    return cls(**kwargs)


def _key(field_name: str) -> str:
    """The config key of a dataclass field: a key that is a Python keyword (`async`) lives in
    the field of that name with an underscore (`async_`)."""
    bare = field_name.rstrip("_")
    return bare if bare != field_name and keyword.iskeyword(bare) else field_name


def _coerce(hint, value, key: str, errors: list[str], path: tuple):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", errors)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            trial: list[str] = []
            result = _coerce(option, value, key, trial, path)
            if not trial:
                return result
        errors.append(f"{key}: expected {_describe(hint)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean {close[0]}?)" if close else ""
            errors.append(f"{key}: {value!r} is not one of {', '.join(map(str, args))}{hint_text}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(f"{key}: expected a number, got {value!r}")
        return value
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{key}: expected a string, got {value!r}")
        return value
    if hint is list or origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return []
        item_cls = _LIST_ITEM_TYPES.get(path)
        if item_cls is not None:
            return [_build(item_cls, item, f"{key}.{i}.", errors) for i, item in enumerate(value)]
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return value
    return value


def _describe(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)


# ------------------------------------------------------------------------ validation


def validate(cfg: Config, check_files: bool = True) -> list[str]:
    """Range and consistency checks that types alone cannot express."""
    errors = []

    def need(ok: bool, message: str):
        if not ok:
            errors.append(message)

    m = cfg.model
    need(m.path is not None or m.config is not None, "model: set model.path (a Hugging Face folder) or model.config (random init)")
    need(not (m.path and m.config), "model: set only one of model.path and model.config")
    if m.path and check_files and not m.path.startswith("builtin:"):
        need(Path(m.path).is_dir(), f"model.path: {m.path} is not a folder (or a builtin: model)")
    if m.config is not None:
        need("model_type" in m.config, "model.config: needs model_type (e.g. llama, bert)")
    if m.tokenizer is None and m.path is None:
        errors.append("model.tokenizer: required with model.config (a tokenizer folder, or train-bpe)")
    if m.tokenizer == "train-bpe":
        need(m.config is not None and "vocab_size" in (m.config or {}), "model.tokenizer: train-bpe needs model.config.vocab_size")
    elif m.tokenizer and check_files and not m.tokenizer.startswith("builtin:"):
        need(Path(m.tokenizer).is_dir(), f"model.tokenizer: {m.tokenizer} is not a folder (or use train-bpe)")
    need(m.num_labels >= 2 or m.task != "sequence_classification", "model.num_labels: must be >= 2")
    if m.quantization != "none":
        need(m.config is None, f"model.quantization: {m.quantization} quantizes pretrained weights as they load; "
             "set model.path (model.config is a random init, which has nothing to quantize)")
        need(cfg.peft.method != "none", f"model.quantization: {m.quantization} freezes the base in 4-bit, which "
             "cannot be trained; set peft.method (lora, dora, ia3, prompt_tuning or prefix_tuning)")
        need(importlib.util.find_spec("bitsandbytes") is not None,
             f"model.quantization: {m.quantization} needs the bitsandbytes package (pip install 'finetrain[qlora]')")

    p = cfg.peft
    if p.method != "none":
        need(p.r > 0, f"peft.r: must be > 0, got {p.r}")
        need(p.alpha > 0, f"peft.alpha: must be > 0, got {p.alpha}")
        need(0 <= p.dropout < 1, f"peft.dropout: must be in [0, 1), got {p.dropout}")
        need(p.num_virtual_tokens > 0, f"peft.num_virtual_tokens: must be > 0, got {p.num_virtual_tokens}")
        if isinstance(p.target_modules, str):
            need(p.target_modules == "all-linear", f"peft.target_modules: a list of module names or all-linear, got {p.target_modules!r}")

    d = cfg.data
    need(d.seq_len >= 16, f"data.seq_len: must be >= 16, got {d.seq_len}")
    need(len(d.datasets) > 0, "data.datasets: at least one dataset is required")
    seen = set()
    for i, ds in enumerate(d.datasets):
        key = f"data.datasets.{i}"
        need(bool(ds.path), f"{key}.path: required")
        need(ds.weight > 0, f"{key}.weight: must be > 0, got {ds.weight}")
        name = ds.name or Path(ds.path).stem
        need(name not in seen, f"{key}.name: {name!r} is used twice (names key the metrics)")
        seen.add(name)
        if check_files and ds.path and not ds.path.startswith("builtin:"):
            need(Path(ds.path).exists(), f"{key}.path: {ds.path} does not exist")
        if m.task == "sequence_classification":
            need(ds.format == "classification", f"{key}.format: model.task sequence_classification needs format classification, got {ds.format}")
        else:
            need(ds.format != "classification", f"{key}.format: classification data needs model.task: sequence_classification")
        if ds.format == "tokenized":
            need(m.tokenizer != "train-bpe", f"{key}.format: tokenized data needs the tokenizer it was tokenized with "
                                             "(model.tokenizer or model.path), not train-bpe")
    need(0 <= d.eval.fraction < 1, f"data.eval.fraction: must be in [0, 1), got {d.eval.fraction}")
    need(not (d.eval.path and d.eval.fraction), "data.eval: set path or fraction, not both")
    if d.eval.path:
        need((d.eval.format == "classification") == (m.task == "sequence_classification"),
             f"data.eval.format: {d.eval.format} does not fit model.task {m.task}")
        need(d.eval.format != "tokenized" or m.tokenizer != "train-bpe",
             "data.eval.format: tokenized data needs the tokenizer it was tokenized with, not train-bpe")
    if d.eval.path and check_files and not d.eval.path.startswith("builtin:"):
        need(Path(d.eval.path).exists(), f"data.eval.path: {d.eval.path} does not exist")
    need(d.eval.generate >= 0, f"data.eval.generate: must be >= 0, got {d.eval.generate}")
    need(d.eval.max_new_tokens > 0, f"data.eval.max_new_tokens: must be > 0, got {d.eval.max_new_tokens}")
    if d.eval.generate:
        eval_formats = [d.eval.format] if d.eval.path else [ds.format for ds in d.datasets] if d.eval.fraction else []
        if m.task != "causal_lm":
            errors.append(f"data.eval.generate: answers are generated by a causal LM, not by model.task {m.task}; "
                          "classification evals report accuracy and macro-F1 (set data.eval.generate=0)")
        elif not eval_formats:
            errors.append("data.eval.generate: there is no held-out data to prompt; set data.eval.fraction or data.eval.path")
        elif not {"chat", "instruction"} & set(eval_formats):
            errors.append(f"data.eval.generate: prompts come from chat or instruction eval data, "
                          f"but the eval data is {', '.join(sorted(set(eval_formats)))}")
    if d.packing and m.task == "sequence_classification":
        errors.append("data.packing: not available for sequence_classification (one label per row); set data.packing=false")
    if d.packing and p.method == "prefix_tuning":
        errors.append(
            "data.packing: prefix tuning feeds its prefix as a KV cache, which every packed document "
            "would attend to across boundaries; set data.packing=false"
        )
    if d.packing and p.method == "prompt_tuning":
        errors.append(
            "data.packing: prompt tuning prepends its virtual tokens once per row and drops position_ids, "
            "so packed documents would not be isolated; set data.packing=false"
        )

    o = cfg.optim
    need(o.lr > 0, f"optim.lr: must be > 0, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    need(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
         f"optim.betas: two numbers in [0, 1), got {o.betas}")
    need(o.eps > 0, f"optim.eps: must be > 0, got {o.eps}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {o.warmup_steps}")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    need(o.max_grad_norm >= 0, f"optim.max_grad_norm: must be >= 0, got {o.max_grad_norm}")

    t = cfg.train
    need(t.micro_batch_size > 0, f"train.micro_batch_size: must be > 0, got {t.micro_batch_size}")
    need(t.global_batch_size > 0, f"train.global_batch_size: must be > 0, got {t.global_batch_size}")
    need(t.global_batch_size % max(t.micro_batch_size, 1) == 0,
         f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.micro_batch_size {t.micro_batch_size}")
    need((t.max_steps is None) != (t.epochs is None), "train: set exactly one of train.max_steps and train.epochs")
    need(t.max_steps is None or t.max_steps > 0, f"train.max_steps: must be > 0, got {t.max_steps}")
    need(t.epochs is None or t.epochs > 0, f"train.epochs: must be > 0, got {t.epochs}")
    for name in ("log_every", "eval_every", "save_every"):
        need(getattr(t, name) >= 0, f"train.{name}: must be >= 0, got {getattr(t, name)}")
    need(t.log_every > 0, "train.log_every: must be > 0")

    lg = cfg.logging
    need(lg.forgetting_warn is None or lg.forgetting_warn > 0,
         f"logging.forgetting_warn: nats of eval loss rise, > 0 (or null for no warning), got {lg.forgetting_warn}")
    need(lg.peak_flops is None or lg.peak_flops > 0,
         f"logging.peak_flops: FLOP/s of one device, > 0 (or null to look it up), got {lg.peak_flops}")

    c = cfg.checkpoint
    need(c.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {c.keep_last}")
    if c.resume not in ("auto", "never") and check_files:
        need(Path(c.resume).is_dir(), f"checkpoint.resume: {c.resume} is not a checkpoint folder (or use auto, never)")

    errors += run_folder_problems(cfg)

    par = cfg.parallel
    if par.deepspeed_config:
        need(par.strategy in ("zero1", "zero2", "zero3"), "parallel.deepspeed_config: only for strategy zero1, zero2 or zero3")
        if check_files:
            need(Path(par.deepspeed_config).is_file(), f"parallel.deepspeed_config: {par.deepspeed_config} does not exist")
    if par.offload == "params":
        need(par.strategy in ("fsdp", "zero3", "auto"),
             "parallel.offload: params offload needs strategy fsdp or zero3 (parameters must be sharded)")
    if par.offload == "optimizer":
        need(par.strategy in ("fsdp", "zero1", "zero2", "zero3", "auto"),
             "parallel.offload: optimizer offload needs strategy fsdp or zero1-3")
    need(par.replicate >= 1, f"parallel.replicate: must be >= 1, got {par.replicate}")
    if par.replicate > 1:
        need(par.strategy in ("fsdp", "auto"), f"parallel.replicate: HSDP ({par.replicate} replicas) needs "
             f"parallel.strategy fsdp, got {par.strategy}")
    if t.compile and par.strategy == "zero3":
        errors.append("train.compile: zero3 gathers parameters in hooks on every submodule of a decoder layer, "
                      "which the compiled layer cannot hold; use fsdp (or zero1/zero2), or train.compile=false")
    if m.dtype == "bfloat16" and par.mixed_precision == "fp32":
        errors.append("model.dtype: bfloat16 master weights cannot compute in parallel.mixed_precision fp32")

    s = cfg.slurm
    need(s.time_min > 0, f"slurm.time_min: must be > 0, got {s.time_min}")
    need(s.max_requeues >= 0, f"slurm.max_requeues: must be >= 0, got {s.max_requeues}")
    need(s.signal_delay_s >= 0, f"slurm.signal_delay_s: must be >= 0, got {s.signal_delay_s}")
    return errors


def cache_root(cfg: Config | None = None) -> Path:
    """The one cache of finetrain (tokenized data, converted models, compiled DeepSpeed ops):
    data.cache_dir, else $FINETRAIN_CACHE, else ~/.cache/finetrain."""
    if cfg is not None and cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    return Path(os.environ.get("FINETRAIN_CACHE", Path.home() / ".cache" / "finetrain"))


def dataset_name(ds: DatasetConfig) -> str:
    return ds.name or Path(ds.path).stem


def to_dict(cfg: Config) -> dict:
    """The config as nested dicts under its keys (what config.yaml holds)."""
    def keys(node):
        if isinstance(node, dict):
            return {_key(k): keys(v) for k, v in node.items()}
        if isinstance(node, list):
            return [keys(v) for v in node]
        return node

    return keys(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
