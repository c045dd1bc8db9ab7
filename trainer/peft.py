"""Parameter-efficient fine-tuning through the peft library: wrap, merge, recognise."""

from __future__ import annotations

import peft
from torch import nn
from transformers.modeling_layers import GenericForSequenceClassification

from trainer.config import PeftConfig

from trainer.errors import ConfigError, UserError

TASK_TYPES = {"causal_lm": peft.TaskType.CAUSAL_LM, "sequence_classification": peft.TaskType.SEQ_CLS}
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")


def apply_peft(model: nn.Module, cfg: PeftConfig, task: str) -> nn.Module:
    """Wrap `model` so only the adapter (and, for classification, the new head) trains.
    Classification uses peft's SEQ_CLS task type, which keeps a trainable copy of the
    head (`score`/`classifier`) in modules_to_save: a frozen random head learns nothing."""
    if cfg.method == "prompt_tuning" and isinstance(model, GenericForSequenceClassification):
        raise ConfigError(
            f"peft.method prompt_tuning: {type(model).__name__} classifies from the last non-pad token, which it "
            "finds in input_ids; prompt tuning feeds embeddings instead, so padded rows would be classified from "
            "a pad token. Use lora, dora, ia3 or prefix_tuning"
        )
    try:
        return peft.get_peft_model(model, _peft_config(model, cfg, TASK_TYPES[task]))
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as err:
        raise ConfigError(f"peft.method {cfg.method}: cannot be applied to {type(model).__name__}: {err}") from err


def _peft_config(model: nn.Module, cfg: PeftConfig, task_type: peft.TaskType) -> peft.PeftConfig:
    if cfg.method in ("lora", "dora"):
        return peft.LoraConfig(
            task_type=task_type,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.method == "dora",
        )
    if cfg.method == "ia3":
        targets = _linear_modules(model, cfg.target_modules)
        return peft.IA3Config(
            task_type=task_type,
            target_modules=targets,
            feedforward_modules=_feedforward_modules(model, targets),
        )
    if cfg.method == "prompt_tuning":
        return peft.PromptTuningConfig(
            task_type=task_type,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.RANDOM,
        )
    if cfg.method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    raise ConfigError(f"peft.method: unknown method {cfg.method!r}")


def _linear_modules(model: nn.Module, target_modules: str | list) -> list[str]:
    """Full names of the linear layers `target_modules` selects (peft's rule: a name, or a
    suffix after a dot), or with "all-linear" every linear layer but the output head."""
    heads = {id(model.get_output_embeddings())} if hasattr(model, "get_output_embeddings") else set()
    heads |= {id(getattr(model, name)) for name in ("score", "classifier") if isinstance(getattr(model, name, None), nn.Module)}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in heads:
            continue
        if target_modules == "all-linear" or any(name == t or name.endswith(f".{t}") for t in target_modules):
            names.append(name)
    if not names:
        raise ConfigError(f"peft.target_modules: {target_modules} selects no linear layer of {type(model).__name__}")
    return names


def _feedforward_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """The second linear of each MLP (Llama down_proj, BERT output.dense): (IA)^3 scales
    the input of those (the MLP's hidden activations) and the output of the rest."""
    intermediate = getattr(getattr(model, "config", None), "intermediate_size", None)
    modules = dict(model.named_modules())
    return [name for name in targets if intermediate is not None and modules[name].in_features == intermediate]


def merge_adapter(model: nn.Module) -> nn.Module:
    """The plain transformers model with the adapter folded into its weights."""
    if not is_peft_model(model):
        raise UserError("merge: the model has no peft adapter (peft.method is none)")
    method = model.active_peft_config.peft_type.value.lower()
    if model.active_peft_config.is_prompt_learning:
        raise UserError(
            f"merge: peft.method {method} cannot be merged: its virtual tokens are extra inputs, not weight "
            "changes; export the adapter (without --merge) and load it with peft"
        )
    return model.merge_and_unload()


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, peft.PeftModel)
