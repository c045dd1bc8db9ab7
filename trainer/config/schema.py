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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from trainer.config.tree import apply_override, build, field_key, rule
from trainer.runtime.errors import ConfigError, decode_utf8, one_line


def positive(default):
    return rule(default, lambda v: v > 0, "must be > 0")


def at_least(default, low):
    return rule(default, lambda v: v >= low, f"must be >= {low}")


# A Hugging Face hub repository id, `org/name`, optionally `@revision` (a branch, tag or commit).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
# A data set in the local Hugging Face cache: `hf:org/name[@revision][:split]` or `...:config:split`.
HUB_DATA_PREFIX = "hf:"


def is_hub_id(value: str) -> bool:
    """`org/name[@revision]` that is no local path: a folder of that name is taken as the folder."""
    return bool(HUB_ID.fullmatch(value)) and not Path(value).exists()


def _local(value: str) -> bool:  # names finetrain resolves itself, not paths
    return value.startswith(("builtin:", HUB_DATA_PREFIX)) or value == "train-bpe"


def folder(default=None, what: str = "a folder"):
    return rule(default, lambda v: _local(v) or Path(v).is_dir() or is_hub_id(v), f"is not {what}", files=True)


def existing(default=None):
    return rule(default, lambda v: _local(v) or Path(v).exists(), "does not exist", files=True)


@dataclass
class RunConfig:
    # The run's name (W&B, the progress bar, the Slurm job).
    name: str = "finetrain"
    # Everything the run writes: config.yaml, metrics.jsonl, checkpoints/, summary.json,
    # report.html (docs/evaluation.md).
    output_dir: str = "runs/finetrain"
    # Model init, data order, dropout: every step reseeds from (seed, step, rank).
    seed: int = 0
    # A fresh run (checkpoint.resume: never) into a folder that holds an earlier run replaces
    # it (trainer/checkpoint/run_folder.py); without this key it is refused.
    overwrite: bool = False


@dataclass
class ModelConfig:
    # A local Hugging Face folder; a hub id (org/name, optionally @revision) read from the local
    # Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub) without network access; or
    # builtin:smollm2-135m-instruct, builtin:all-minilm-l6-v2; or `config` instead.
    path: Optional[str] = folder(what="a folder, a hub id (org/name) or a builtin: model")
    # Instead of `path`: a transformers config dict (model_type, sizes) for a seeded random init.
    config: Optional[dict] = rule(None, lambda v: "model_type" in v, "needs model_type (e.g. llama, bert)")
    # A tokenizer folder or hub id (default: `path`), or "train-bpe": a byte-level BPE trained on the
    # training data (model.config.vocab_size tokens).
    tokenizer: Optional[str] = folder(what="a folder, a hub id (org/name) or train-bpe")
    # The master weights' dtype (the compute dtype is parallel.mixed_precision).
    dtype: Literal["float32", "bfloat16"] = "float32"
    # nf4 (QLoRA): the base's linear layers quantized to 4-bit NormalFloat as they load, frozen;
    # a peft.method trains on top; single, ddp, fsdp (docs/adapters.md).
    quantization: Literal["none", "nf4"] = "none"
    # auto: on CUDA with bf16 compute flash_attention_2 where flash-attn is installed, else
    # torch_varlen; elsewhere sdpa_varlen for packed rows, sdpa for unpacked ones.
    # flash_attention_2: flash-attn's kernels; torch_varlen: the FlashAttention kernels inside
    # torch 2.10+ (FA3 on Hopper where torch offers it: nothing to build); sdpa_varlen: sdpa one
    # document at a time, any device; sdpa, eager: a block mask; varlen_reference: the
    # FlashAttention varlen inputs computed in plain torch (docs/performance.md).
    attention: Literal["auto", "flash_attention_2", "torch_varlen", "sdpa_varlen", "sdpa", "eager", "varlen_reference"] = "auto"
    # sequence_classification: an encoder or decoder with a linear head; reward_model: a decoder with a
    # scalar head trained on preference pairs (Bradley-Terry), exported as a sequence-classification
    # model with one label (docs/preference.md).
    task: Literal["causal_lm", "sequence_classification", "reward_model"] = "causal_lm"
    # Classification classes.
    num_labels: int = at_least(2, 2)
    # The base model's attention and hidden dropout while fine-tuning (null: as its config has it),
    # set on every dropout its architecture has (Llama/Qwen attention_dropout; BERT
    # hidden_dropout_prob, attention_probs_dropout_prob; GPT-2 resid_pdrop, embd_pdrop, attn_pdrop;
    # heads' dropouts untouched); refused by name where the model has none (Mamba, RWKV).
    dropout: Optional[float] = rule(None, lambda v: 0 <= v < 1, "a probability in [0, 1)")
    # auto: the tokenizer's template (finetrain's ChatML if none); finetrain: ChatML with tools, tool
    # calls, tool results and reasoning; or a Jinja file.
    chat_template: str = rule("auto", lambda v: v in ("auto", "finetrain") or Path(v).is_file(),
                              "is not a file (auto, finetrain or a Jinja file)", files=True)


@dataclass
class PeftConfig:
    # none; any method of the installed peft by name (lora, loha, lokr, oft, boft, vera, adalora,
    # ia3, ln_tuning, prompt_tuning, prefix_tuning, p_tuning, adaption_prompt, ...); dora; or
    # bottleneck (trainer/peft/bottleneck.py). See docs/adapters.md.
    method: str = "none"
    # The rank, set on the method's field of that meaning (r; AdaLoRA's target_r); refused where
    # the method has none.
    r: int = positive(8)
    # The scaling (lora_alpha or alpha); refused where the method has none.
    alpha: float = positive(16.0)
    # The adapter's input dropout (lora_dropout, vera_dropout, boft_dropout); refused where the
    # method has none.
    dropout: float = rule(0.0, lambda v: 0 <= v < 1, "must be in [0, 1)")
    # Module names, or "all-linear" (every linear layer but the output head).
    target_modules: Union[str, list] = rule("all-linear", lambda v: not isinstance(v, str) or v == "all-linear",
                                            "a list of module names or all-linear")
    num_virtual_tokens: int = positive(16)  # prompt and prefix tuning
    # Any other key of the method's config ({use_rslora: true}, {oft_block_size: 16},
    # {rank_dropout: 0.1}; bottleneck: reduction_factor, placement, activation), checked by the
    # method's config class at start-up.
    options: dict = field(default_factory=dict)
    # An adapter folder (finetrain export's, or peft's save_pretrained) the adapter starts from, e.g.
    # an SFT adapter continued by preference tuning; its own adapter_config.json decides the method's
    # settings. With preference.reference adapter, the reference is this adapter, not the bare base.
    adapter_path: Optional[str] = folder(what="an adapter folder (adapter_config.json and its weights)")


@dataclass
class DatasetConfig:
    # Names the data set in the metrics (data/<name>/...) and its held-out set; default: the file's stem.
    name: str = ""
    # A data file (JSON Lines, JSON, Parquet, CSV), a save_to_disk folder, builtin:NAME, or
    # hf:org/name[:split] (hf:org/name:config:split) from the local Hugging Face cache, offline
    # (docs/data-formats.md).
    path: str = existing("")
    # How its rows are read and what in them trains (docs/data-formats.md); preference and
    # unpaired_preference rows train with the preference section's loss (docs/preference.md).
    format: Literal["chat", "instruction", "text", "classification", "tokenized", "preference",
                    "unpaired_preference"] = "chat"
    # Its share of the mix, against the other data sets' weights (they need not sum to 1).
    weight: float = positive(1.0)
    # finetrain's field names -> the file's, e.g. {messages: conversations, role: from, content: value}.
    fields: dict = field(default_factory=dict)
    # chat/instruction: the parts of assistant turns that train ([content, tool_calls] keeps the
    # reasoning out of the loss); tool results never do.
    train_on: list = field(default_factory=lambda: ["content", "reasoning", "tool_calls"])


EVAL_FORMATS = Literal["chat", "instruction", "text", "classification", "tokenized", "choice", "preference",
                       "unpaired_preference"]


@dataclass
class EvalSetConfig:
    # Keys the set's metrics, eval/<name>/...; default: the file's stem.
    name: str = ""
    # A data file, builtin:NAME (e.g. builtin:lee-cloze), or hf:org/name[:config]:split.
    path: str = existing("")
    # Any data format, or choice (multiple choice, scored by acc and acc_norm); preference sets report
    # their preference loss, rewards/accuracies and rewards/margins.
    format: EVAL_FORMATS = "chat"
    # As a data set's fields, dotted for nested ones (HellaSwag {context: ctx, choices: endings, answer: label}).
    fields: dict = field(default_factory=dict)
    # Overrides data.eval.metrics (choice sets: acc, acc_norm).
    metrics: Optional[list] = None
    # true: a forgetting check with margin logging.forgetting_warn; a number: its own margin.
    forgetting: Union[bool, float] = rule(False, lambda v: isinstance(v, bool) or v > 0,
                                          "true, false, or a margin > 0 (nats of loss rise, or accuracy drop)")
    # The first N of the file; default: data.eval.max_examples.
    max_examples: Optional[int] = positive(None)


@dataclass
class EvalDataConfig:
    # Held-out data: a file (the eval set "eval"), or a fraction of each training dataset set aside.
    path: Optional[str] = existing()
    # The format of the `path` file (any data format, or choice).
    format: EVAL_FORMATS = "chat"
    # Field names of the `path` file, as a data set's fields.
    fields: dict = field(default_factory=dict)
    # Held out of each training data set (one eval set per data set, under its name). Training rows
    # that share a held-out row's prompt (a repeated question, a duplicated row) are left out of
    # training too, counted as data/<dataset>/held_out_prompt_twins.
    fraction: float = rule(0.0, lambda v: 0 <= v < 1, "must be in [0, 1)")
    # Examples evaluated per set.
    max_examples: int = positive(512)
    # Held-out prompts of each chat/instruction eval set answered greedily at every eval (0: none),
    # scored with the set's metrics.
    generate: int = at_least(0, 0)
    # The longest generated answer, in tokens.
    max_new_tokens: int = positive(64)
    # What generated answers are scored with: rouge_l, exact_match, token_f1 (per answer, averaged;
    # logged as rougeL, exact_match, f1), bleu, chrf (sacrebleu's corpus scores, 0-100).
    metrics: list = field(default_factory=lambda: ["rouge_l", "exact_match", "token_f1"])
    # More eval sets (trainer/data/eval_sets.py); `forgetting`: true, or its own margin, makes one a
    # forgetting check; metrics and max_examples default to data.eval's.
    sets: list[EvalSetConfig] = field(default_factory=list)


@dataclass
class DataConfig:
    # Row length in tokens.
    seq_len: int = at_least(2048, 16)
    # Many documents per row, each isolated (docs/performance.md).
    packing: bool = True
    # Also train on user and prompt tokens (tool results never).
    train_on_prompt: bool = False
    # The training data sets, mixed by weight.
    datasets: list[DatasetConfig] = field(default_factory=list)
    # Evaluation at step 0, every train.eval_every steps and at the end (docs/evaluation.md).
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)
    # Weights count examples or tokens.
    mix_by: Literal["examples", "tokens"] = "examples"
    # Examples longer than seq_len (text documents are split into chunks instead).
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    # error: stop, naming the file and line; skip: skip and count (data/<name>/bad_rows_skipped).
    on_bad_row: Literal["error", "skip"] = "error"
    # finetrain's cache (cache_root): tokenized data as memory-mapped arrays, converted models,
    # compiled DeepSpeed ops; nodes may share it. Default: $FINETRAIN_CACHE, else ~/.cache/finetrain.
    cache_dir: Optional[str] = None
    # Stop when a trained assistant turn of the first rows lacks the template's end-of-turn target
    # (docs/data-formats.md).
    check_end_of_turn: bool = True


@dataclass
class PreferenceConfig:
    # The loss of preference data (docs/preference.md gives each formula): dpo (sigmoid), ipo, hinge,
    # robust (with label_smoothing), simpo (length-normalised, no reference), orpo (odds ratio plus the
    # chosen answer's NLL, no reference), kto (unpaired rows, or pairs split into two).
    loss: Literal["dpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = "dpo"
    # The strength of the preference: DPO's beta (the KL penalty), ORPO's lambda.
    beta: float = positive(0.1)
    # dpo (conservative DPO) and robust: the probability that a pair's preference is flipped.
    label_smoothing: float = rule(0.0, lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
    # simpo: the target reward margin.
    gamma: float = at_least(0.5, 0)
    # Adds sft_weight times the chosen answers' token-mean NLL (RPO); orpo has its own.
    sft_weight: float = at_least(0.0, 0)
    # The reference model: adapter (the peft adapter switched off: no second copy), precomputed (one
    # pass of the initial model before step 1, stored beside the tokenized cache), copy (a frozen
    # second model sharded like the trained one); auto: adapter for peft runs, precomputed otherwise.
    reference: Literal["auto", "adapter", "precomputed", "copy"] = "auto"


@dataclass
class ParallelConfig:
    # A strategy of trainer/parallel/ (each declares its names and what it supports): single, ddp,
    # fsdp, zero1, zero2, zero3; or auto: single on one rank, fsdp on more (docs/parallelism.md).
    strategy: str = "auto"
    # fsdp (optimizer and params alike: FSDP2's CPUOffloadPolicy) and zero1-3: state in host memory.
    offload: Literal["none", "optimizer", "params"] = "none"
    # The compute dtype; reductions and the loss stay fp32. auto: bf16 on CUDA, on a CPU with native
    # bf16 matmuls (AVX512-BF16 or AMX) and with bfloat16 master weights; fp32 elsewhere (bf16 on
    # other CPUs runs through reference kernels, tens of times slower). The start-up line says which.
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Recompute each decoder layer in backward (every strategy).
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True  # fsdp: ZeRO-3 style; False keeps params gathered (ZeRO-2 style)
    # HSDP: parameters sharded within groups of world/replicate ranks (a node), replicated across groups.
    replicate: int = at_least(1, 1)
    # Ulysses: each row's tokens split over N ranks (trainer/model/sequence_parallel.py); ddp, fsdp
    # (HSDP too), zero1-3 (docs/parallelism.md).
    sequence_parallel: int = at_least(1, 1)
    # zero1-3: a DeepSpeed JSON whose keys override the generated ones.
    deepspeed_config: Optional[str] = rule(None, lambda v: Path(v).is_file(), "does not exist", files=True)
    # A rank that makes no progress this long ends the run, named (trainer/runtime/faults.py): set-up, the first
    # step, evaluations and checkpoints under init_timeout_s, every other step under step_timeout_s
    # (docs/faults.md).
    init_timeout_s: int = positive(300)
    # Seconds a step after the first may go without progress before the run ends, naming the rank.
    step_timeout_s: int = positive(100)


@dataclass
class OptimConfig:
    # The peak learning rate (AdamW, torch's fused kernel).
    lr: float = positive(2e-5)
    # Not applied to biases, norms and embeddings.
    weight_decay: float = at_least(0.01, 0)
    # AdamW's betas.
    betas: list = rule(None, lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
                       "two numbers in [0, 1)", factory=lambda: [0.9, 0.95])
    eps: float = positive(1e-8)  # AdamW's epsilon
    # The decay after optim.warmup_steps of linear warmup.
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = at_least(0, 0)  # optimizer steps of linear warmup from 0
    min_lr_ratio: float = rule(0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]")  # decay to lr * min_lr_ratio
    max_grad_norm: float = at_least(1.0, 0)  # 0 disables clipping


@dataclass
class TrainConfig:
    # Rows per forward on one rank.
    micro_batch_size: int = positive(1)
    # Rows per optimizer step, all ranks and accumulation steps: accumulation = global / (micro x ranks).
    global_batch_size: int = positive(8)
    # Exactly one of max_steps and epochs.
    max_steps: Optional[int] = positive(None)
    # One epoch is one pass over the data set with the largest weight, the others mixed in.
    epochs: Optional[float] = positive(None)
    # In optimizer steps.
    log_every: int = positive(1)
    eval_every: int = at_least(0, 0)  # 0: evaluate only at the end (and at step 0, the baseline of loss_change)
    save_every: int = at_least(0, 0)  # 0: save only at the end (and on a stop signal)
    # LM head + cross-entropy on target positions only, in chunks (trainer/model/loss_head.py): no
    # [tokens, vocab] logits; false: full logits (docs/performance.md).
    fused_loss: bool = True
    # torch.compile each decoder layer (trainer/model/compile.py); single, ddp, fsdp, zero1, zero2
    # (refused with zero3; docs/performance.md).
    compile: bool = False
    # What forward saves for backward waits in host memory (trainer/model/activation_offload.py): with
    # activation checkpointing, the layers' inputs; pinned, asynchronous copies on CUDA (docs/parallelism.md).
    activation_offload: bool = False
    # A step whose loss or gradient norm is NaN or infinite never updates the weights; stop ends the
    # run there (exit code 3, nothing saved), skip goes on, up to max_skipped_steps in a row (docs/faults.md).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = at_least(10, 1)  # with skip: this many steps in a row end the run (exit code 3)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"  # relative to run.output_dir
    # Complete checkpoints kept (never the newest one whose weights are known finite).
    keep_last: int = at_least(2, 1)
    # auto: the newest checkpoint that passes its checksums (none: a fresh run); never; or a
    # checkpoint folder (docs/faults.md).
    resume: str = rule("auto", lambda v: v in ("auto", "never") or Path(v).is_dir(),
                       "is not a checkpoint folder (or use auto, never)", files=True)
    # key `async`: written in the background, sealed once every rank's write has finished (DCP
    # async_save; single, ddp, fsdp). Training waits only for the copy of the state to host memory
    # (buffers kept for the run: one more copy of the rank's saved state); a stop or the last step
    # waits for the write.
    async_: bool = False


@dataclass
class WandbConfig:
    # online without credentials logs offline, saying so; a resumed run logs into the same W&B run.
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "finetrain"  # the W&B project
    entity: Optional[str] = None  # the W&B team or user (default: the login's)
    tags: list = field(default_factory=list)  # the W&B run's tags


@dataclass
class MlflowConfig:
    # The MLflow experiment the run logs into (created when missing); null: no MLflow.
    experiment: Optional[str] = None
    # The MLflow tracking server or store (http://host:5000, databricks, file:./mlruns); null:
    # MLflow's own default ($MLFLOW_TRACKING_URI).
    tracking_uri: Optional[str] = None


@dataclass
class LoggingConfig:
    # Weights & Biases (docs/evaluation.md).
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # TensorBoard event files in run.output_dir/tensorboard: every scalar of metrics.jsonl, the
    # config as text; a resumed run goes on in the same folder.
    tensorboard: bool = False
    # MLflow: every scalar of metrics.jsonl, the config as the run's parameters; a resumed run logs
    # into the same MLflow run (its id is kept in the checkpoint).
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # metrics.jsonl in run.output_dir.
    jsonl: bool = True
    # A progress bar on rank 0's console.
    progress_bar: bool = True
    # Margin past which a forgetting check warns, once per set: nats of eval loss rise over step 0
    # (rehearsal sets, sets marked forgetting), or accuracy drop (0.1 = ten points); null: never.
    forgetting_warn: Optional[float] = rule(0.1, lambda v: v > 0,
                                            "nats of eval loss rise, > 0 (or null for no warning)")
    # Peak FLOP/s of one device for MFU; default: a table of GPUs, on CPUs a matmul measured once.
    peak_flops: Optional[float] = rule(None, lambda v: v > 0, "FLOP/s of one device, > 0 (or null to look it up)")


@dataclass
class SlurmConfig:
    # The Slurm partition. Every slurm key is a default of finetrain submit, whose flags (--partition,
    # --time, ...) override it.
    partition: Optional[str] = None
    account: Optional[str] = None  # the Slurm account charged
    qos: Optional[str] = None  # the Slurm quality of service
    # The job's time limit in minutes.
    time_min: int = positive(60)
    # CPUs of each task (one task per rank).
    cpus_per_task: int = positive(8)
    mem_gb: int = at_least(0, 0)  # 0: the partition's default
    # The most time-limit requeues (submitit counts every stop after 80 % of the time limit as one).
    max_requeues: int = at_least(10, 0)
    # Restarts of a failed attempt (a dead, killed or hung rank, a checkpoint that could not be
    # written) from the newest checkpoint, within the job: finetrain train's --max-restarts in
    # slurm/train.sbatch, a requeue of the job under finetrain submit (docs/faults.md).
    max_restarts: int = at_least(3, 0)
    # Seconds before the time limit at which every rank checkpoints and the job requeues.
    signal_delay_s: int = at_least(120, 0)

@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
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
        text = decode_utf8(path.read_bytes(), path, ConfigError)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            if mark is not None:
                where = f":{mark.line + 1}"
            elif isinstance(getattr(err, "position", None), int):  # a character YAML does not take
                where = f":{text[:err.position].count(chr(10)) + 1}"
            else:
                where = ""
            problem = str(getattr(err, "problem", None) or err).splitlines()[0]
            raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run, model, data, ...)")
    for item in overrides:
        apply_override(raw, item)
    errors: list[str] = []
    cfg = build(Config, raw, "", errors, check_files)
    if errors:
        raise ConfigError("\n".join(one_line(error) for error in errors))
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


def flatten(node, prefix: str = "") -> dict:
    """Nested dicts (and lists of dicts) as {dotted key: value}: `optim.lr`, `data.datasets.0.path`."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
        return {k: v for i, item in enumerate(node) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): node}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
