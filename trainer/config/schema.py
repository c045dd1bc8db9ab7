"""The config schema: dataclasses, YAML loading, dotted overrides, coercion and per-key rules.

Everything a run can be told lives here, with its default. `load_config` reads the YAML,
applies `key=value` overrides, coerces every value to its key's type and checks the rule each
key carries on its own (a range, a file that must exist): one `ConfigError` line per problem,
naming the key (the typed building and the overrides of any dataclass tree are
trainer/config/tree.py's). Rules relating several keys are the run plan's (trainer/plan.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from trainer.config.tree import apply_override, build, field_key, rule
from trainer.runtime.errors import ConfigError


def positive(default):
    return rule(default, lambda v: v > 0, "must be > 0")


def at_least(default, low):
    return rule(default, lambda v: v >= low, f"must be >= {low}")


def _local(value: str) -> bool:  # names of things finetrain builds itself, not paths
    return value.startswith("builtin:") or value == "train-bpe"


def folder(default=None, what: str = "a folder"):
    return rule(default, lambda v: _local(v) or Path(v).is_dir(), f"is not {what}", files=True)


def existing(default=None):
    return rule(default, lambda v: _local(v) or Path(v).exists(), "does not exist", files=True)


@dataclass
class RunConfig:
    name: str = "finetrain"
    output_dir: str = "runs/finetrain"
    seed: int = 0
    # A fresh run (checkpoint.resume: never) into a folder that holds an earlier run replaces
    # it (trainer/checkpoint/run_folder.py); without this key it is refused.
    overwrite: bool = False


@dataclass
class ModelConfig:
    # A local Hugging Face folder or builtin:NAME; or `config`, a transformers config dict (seeded random init).
    path: Optional[str] = folder(what="a folder (or a builtin: model)")
    config: Optional[dict] = rule(None, lambda v: "model_type" in v, "needs model_type (e.g. llama, bert)")
    # A tokenizer folder (default: `path`), or "train-bpe": a byte-level BPE trained on the training data.
    tokenizer: Optional[str] = folder(what="a folder (or use train-bpe)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    # nf4 (QLoRA): the base's linear layers quantized to 4-bit NormalFloat as they load, frozen.
    quantization: Literal["none", "nf4"] = "none"
    attention: Literal["auto", "flash_attention_2", "torch_varlen", "sdpa_varlen", "sdpa", "eager", "varlen_reference"] = "auto"
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    num_labels: int = at_least(2, 2)
    # The base model's attention and hidden dropout while fine-tuning (null: as its config has it).
    dropout: Optional[float] = rule(None, lambda v: 0 <= v < 1, "a probability in [0, 1)")
    # auto: the tokenizer's template (finetrain's ChatML if none); finetrain: ChatML with tools and
    # reasoning; or a Jinja file.
    chat_template: str = rule("auto", lambda v: v in ("auto", "finetrain") or Path(v).is_file(),
                              "is not a file (auto, finetrain or a Jinja file)", files=True)


@dataclass
class PeftConfig:
    # none; any method of the installed peft (lora, loha, oft, ...); dora; or bottleneck (trainer/peft/bottleneck.py).
    method: str = "none"
    r: int = positive(8)
    alpha: float = positive(16.0)
    dropout: float = rule(0.0, lambda v: 0 <= v < 1, "must be in [0, 1)")
    # Module names, or "all-linear" (every linear layer but the output head).
    target_modules: Union[str, list] = rule("all-linear", lambda v: not isinstance(v, str) or v == "all-linear",
                                            "a list of module names or all-linear")
    num_virtual_tokens: int = positive(16)  # prompt and prefix tuning
    options: dict = field(default_factory=dict)  # any other key of the method's config, checked by it


@dataclass
class DatasetConfig:
    name: str = ""
    path: str = existing("")
    format: Literal["chat", "instruction", "text", "classification", "tokenized"] = "chat"
    weight: float = positive(1.0)
    # finetrain's field names -> the file's, e.g. {messages: conversations, role: from, content: value}.
    fields: dict = field(default_factory=dict)
    # chat/instruction: the parts of assistant turns that train; tool results never do.
    train_on: list = field(default_factory=lambda: ["content", "reasoning", "tool_calls"])


EVAL_FORMATS = Literal["chat", "instruction", "text", "classification", "tokenized", "choice"]


@dataclass
class EvalSetConfig:
    # One more eval set (trainer/data/eval_sets.py); `forgetting`: true, or its own margin, makes it a
    # forgetting check; metrics and max_examples default to data.eval's.
    name: str = ""
    path: str = existing("")
    format: EVAL_FORMATS = "chat"
    fields: dict = field(default_factory=dict)
    metrics: Optional[list] = None
    forgetting: Union[bool, float] = rule(False, lambda v: isinstance(v, bool) or v > 0,
                                          "true, false, or a margin > 0 (nats of loss rise, or accuracy drop)")
    max_examples: Optional[int] = positive(None)


@dataclass
class EvalDataConfig:
    # Held-out data: a file (the eval set "eval"), or a fraction of each training dataset set aside.
    path: Optional[str] = existing()
    format: EVAL_FORMATS = "chat"
    fields: dict = field(default_factory=dict)
    fraction: float = rule(0.0, lambda v: 0 <= v < 1, "must be in [0, 1)")
    max_examples: int = positive(512)
    # Held-out prompts of each chat/instruction eval set answered greedily at every eval (0: none).
    generate: int = at_least(0, 0)
    max_new_tokens: int = positive(64)
    metrics: list = field(default_factory=lambda: ["rouge_l", "exact_match", "token_f1"])
    sets: list[EvalSetConfig] = field(default_factory=list)


@dataclass
class DataConfig:
    seq_len: int = at_least(2048, 16)
    packing: bool = True
    train_on_prompt: bool = False
    datasets: list[DatasetConfig] = field(default_factory=list)
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)
    mix_by: Literal["examples", "tokens"] = "examples"
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    on_bad_row: Literal["error", "skip"] = "error"
    cache_dir: Optional[str] = None  # finetrain's cache (see cache_root); default: $FINETRAIN_CACHE or ~/.cache/finetrain
    # Stop when a trained assistant turn of the first rows lacks the template's end-of-turn target.
    check_end_of_turn: bool = True


@dataclass
class ParallelConfig:
    # A strategy of trainer/parallel/ (each declares its names and what it supports), or auto.
    strategy: str = "auto"
    offload: Literal["none", "optimizer", "params"] = "none"
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True  # fsdp: ZeRO-3 style; False keeps params gathered (ZeRO-2 style)
    # HSDP: parameters sharded within groups of world/replicate ranks (a node), replicated across groups.
    replicate: int = at_least(1, 1)
    sequence_parallel: int = at_least(1, 1)  # Ulysses: each row's tokens split over N ranks (trainer/model/sequence_parallel.py)
    # A DeepSpeed JSON whose keys override the generated ones.
    deepspeed_config: Optional[str] = rule(None, lambda v: Path(v).is_file(), "does not exist", files=True)
    # A rank that makes no progress this long ends the run, named (trainer/runtime/faults.py): set-up, the first
    # step, evaluations and checkpoints under init_timeout_s, every other step under step_timeout_s.
    init_timeout_s: int = positive(300)
    step_timeout_s: int = positive(100)


@dataclass
class OptimConfig:
    lr: float = positive(2e-5)
    weight_decay: float = at_least(0.01, 0)
    betas: list = rule(None, lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
                       "two numbers in [0, 1)", factory=lambda: [0.9, 0.95])
    eps: float = positive(1e-8)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = at_least(0, 0)
    min_lr_ratio: float = rule(0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]")  # decay to lr * min_lr_ratio
    max_grad_norm: float = at_least(1.0, 0)  # 0 disables clipping


@dataclass
class TrainConfig:
    micro_batch_size: int = positive(1)
    global_batch_size: int = positive(8)  # rows per optimizer step, all ranks and accumulation steps
    max_steps: Optional[int] = positive(None)
    epochs: Optional[float] = positive(None)
    log_every: int = positive(1)
    eval_every: int = at_least(0, 0)  # 0: evaluate only at the end (and at step 0, the baseline of loss_change)
    save_every: int = at_least(0, 0)  # 0: save only at the end (and on a stop signal)
    # LM head + cross-entropy on target positions only, in chunks (trainer/model/loss_head.py).
    fused_loss: bool = True
    compile: bool = False  # torch.compile each decoder layer (trainer/model/compile.py)
    activation_offload: bool = False  # saved activations in host memory until backward (trainer/model/activation_offload.py)
    # A step whose loss or gradient norm is NaN or infinite never updates the weights; stop ends the
    # run there (exit code 3, nothing saved), skip goes on, up to max_skipped_steps in a row.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = at_least(10, 1)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"  # relative to run.output_dir
    keep_last: int = at_least(2, 1)
    resume: str = rule("auto", lambda v: v in ("auto", "never") or Path(v).is_dir(),
                       "is not a checkpoint folder (or use auto, never)", files=True)
    # key `async`: written in the background, sealed once every rank's write has finished.
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
    # Margin past which a forgetting check warns, once per set: nats of eval loss rise over step 0
    # (rehearsal sets, sets marked forgetting), or accuracy drop (0.1 = ten points); null: never.
    forgetting_warn: Optional[float] = rule(0.1, lambda v: v > 0,
                                            "nats of eval loss rise, > 0 (or null for no warning)")
    # Peak FLOP/s of one device for MFU; default: a table of GPUs, on CPUs a matmul measured once.
    peak_flops: Optional[float] = rule(None, lambda v: v > 0, "FLOP/s of one device, > 0 (or null to look it up)")


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = positive(60)
    cpus_per_task: int = positive(8)
    mem_gb: int = at_least(0, 0)  # 0: the partition's default
    max_requeues: int = at_least(10, 0)
    signal_delay_s: int = at_least(120, 0)


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


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """Read YAML at `path`, apply `key=value` overrides, coerce and check every key on its
    own; raise ConfigError. (What the keys mean together: trainer/plan.py.)"""
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
        apply_override(raw, item)
    errors: list[str] = []
    cfg = build(Config, raw, "", errors, check_files)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


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
            return {field_key(k): keys(v) for k, v in node.items()}
        if isinstance(node, list):
            return [keys(v) for v in node]
        return node

    return keys(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
