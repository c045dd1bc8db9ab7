"""Parameter-efficient fine-tuning: any method of the installed peft by name, finetrain's
bottleneck adapters (trainer/peft/bottleneck.py); wrap, check, merge, recognise.

`peft.method` is a peft method's name (its `PeftType` in lower case: lora, loha, lokr, oft,
vera, adalora, ia3, ln_tuning, prompt_tuning, prefix_tuning, ...), `dora` (LoRA with
weight decomposition) or `bottleneck`. finetrain's generic keys set the field of the
method's config that means the same thing (`peft.r` -> `r`, `peft.alpha` -> `lora_alpha` or
`alpha`, `peft.dropout` -> the input dropout, ...); a generic key set where the method has no
such field is refused, and everything else the method takes goes in `peft.options`, which the
method's own config class checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
from functools import lru_cache
from typing import TYPE_CHECKING

from trainer.config.capabilities import WHOLE_BASE_WEIGHTS, WHOLE_GRADIENTS
from trainer.config.schema import Config, PeftConfig
from trainer.peft.bottleneck import (BottleneckOptions, add_bottleneck_adapters, adapters_switched_off,
                                    bottleneck_problems, is_bottleneck_model)
from trainer.runtime.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch
    from torch import nn


# finetrain's own names, beside peft's.
OWN_METHODS = ("none", "dora", "bottleneck")

# peft methods finetrain cannot train, and why: their forward needs inputs a training row does
# not have, or they combine adapters trained before.
UNTRAINABLE = {
    "poly": "routes each row through skills chosen by a task id (task_ids), which finetrain's rows do not carry",
    "multitask_prompt_tuning": "selects a prompt by a task id (task_ids) per row, which finetrain's rows do not carry",
    "cpt": "trains with its own loss over token-type masks (cpt_token_ids), not finetrain's target-token loss",
    "xlora": "mixes LoRA adapters trained before (its `adapters` option); train each LoRA, then mix them with peft",
    "shadow": "fails in forward on transformers models (peft 0.21); use another method",
}

# Config fields finetrain sets itself: never in peft.options.
_RESERVED = {
    "task_type": "set from model.task",
    "peft_type": "set by peft.method",
    "base_model_name_or_path": "set by peft from the model",
    "revision": "set by peft from the model",
    "inference_mode": "finetrain trains the adapter",
    "total_step": "set to the run's optimizer steps",
}

# Methods whose target modules are not linear layers: peft.target_modules all-linear leaves them
# their per-architecture default.
_NON_LINEAR_TARGETS = ("ln_tuning", "adaption_prompt", "trainable_tokens")


# --------------------------------------------------------------------------- methods


@lru_cache(maxsize=1)
def peft_methods() -> dict:
    """Every method of the installed peft by finetrain's name for it -> its config class."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    methods = {peft_type.value.lower(): config_cls for peft_type, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    methods["dora"] = peft.LoraConfig
    return dict(sorted(methods.items()))


def known_methods() -> list[str]:
    return sorted(set(OWN_METHODS) | set(peft_methods()))


def is_prompt_learning(method: str) -> bool:
    """Methods that feed virtual tokens or a KV-cache prefix instead of changing weights."""
    if method in OWN_METHODS:
        return False
    import peft

    cls = peft_methods().get(method)
    return cls is not None and issubclass(cls, peft.PromptLearningConfig)


def prepends_virtual_tokens(method: str) -> bool:
    """Prompt tuning and p-tuning put learned embeddings before each row's tokens (prefix
    tuning and its kin hand attention a KV cache instead)."""
    return method in ("prompt_tuning", "p_tuning")


def can_merge(method: str) -> bool:
    """Whether the method's adapter folds into the base weights (`finetrain export --merge`)."""
    return method not in UNTRAINABLE and merge_problem(method) is None


# peft tuners whose adapter is not a weight change (or whose peft has no merge for it).
_UNMERGEABLE = ("adaption_prompt", "lily", "cartridge")


# --------------------------------------------------------------------------- config keys


def _generic_fields(method: str, config_cls) -> dict[str, str]:
    """finetrain's generic keys -> the field of `config_cls` each one sets for `method`."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    found = {}
    if method == "adalora":
        found["r"] = "target_r"  # AdaLoRA's own `r` is unused: ranks start at init_r, end at target_r on average
    elif method != "oft" and "r" in fields:  # OFT's r counts blocks and excludes oft_block_size
        found["r"] = "r"
    alpha = next((name for name in ("lora_alpha", "alpha") if name in fields), None)
    if alpha:
        found["alpha"] = alpha
    dropout = next((name for name in ("lora_dropout", f"{method}_dropout") if name in fields), None)
    if dropout:
        found["dropout"] = dropout
    if "target_modules" in fields:
        found["target_modules"] = "target_modules"
    if "num_virtual_tokens" in fields:
        found["num_virtual_tokens"] = "num_virtual_tokens"
    return found


def peft_keys(method: str) -> set[str]:
    """The generic keys (r, alpha, dropout, target_modules, num_virtual_tokens) `method` takes."""
    if method == "none":
        return set()
    if method == "bottleneck":
        return {"dropout"}
    cls = peft_methods().get(method)
    return set(_generic_fields(method, cls)) if cls else set()


_WHAT = {"r": "rank", "alpha": "scaling alpha", "dropout": "input dropout", "target_modules": "target modules",
         "num_virtual_tokens": "virtual tokens"}


def peft_config_problems(cfg: Config) -> list[str]:
    """What is wrong with the `peft.*` keys (and the keys that depend on the method), one
    line each, starting with the key; peft is imported only when a peft method is named."""

    p = cfg.peft
    problems = _adapter_path_problems(p)
    defaults = PeftConfig()
    if p.method == "none":
        if p.options:
            problems.append("peft.options: set, but peft.method is none (options belong to a method)")
        return problems
    if p.method == "bottleneck":

        problems += _generic_problems(p, defaults, {"dropout"}, "bottleneck",
                                      [f.name for f in dataclasses.fields(BottleneckOptions)])
        problems += bottleneck_problems(p, cfg.model.task)
        return problems
    methods = peft_methods()
    if p.method not in methods:
        import peft

        close = difflib.get_close_matches(p.method, known_methods(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"peft.method: {p.method!r} is not a method of peft {peft.__version__} nor of finetrain"
                        f"{hint}; one of: {', '.join(known_methods())}")
        return problems
    if p.method in UNTRAINABLE:
        problems.append(f"peft.method: {p.method} {UNTRAINABLE[p.method]}")
        return problems
    config_cls = methods[p.method]
    generic = _generic_fields(p.method, config_cls)
    own = [f.name for f in dataclasses.fields(config_cls) if f.name not in _RESERVED and f.name not in generic.values()]
    problems += _generic_problems(p, defaults, set(generic), p.method, own)
    problems += _option_problems(p, config_cls, generic)
    if not problems:
        try:
            _config_instance(p, config_cls, generic, "CAUSAL_LM", total_steps=cfg.train.max_steps or 1000,
                             target_modules=None)
        except (TypeError, ValueError) as err:
            problems.append(f"peft.options: {p.method} ({config_cls.__name__}) refuses them: {_gist(err)}")
    if cfg.data.packing and is_prompt_learning(p.method):
        why = ("prepends its virtual tokens once per row and drops position_ids" if prepends_virtual_tokens(p.method)
               else "feeds its prefix as a KV cache, which every packed document would attend to")
        problems.append(f"data.packing: peft.method {p.method} {why}, so packed documents would not be isolated; "
                        "set data.packing=false")
    return problems


def _adapter_path_problems(p: PeftConfig) -> list[str]:
    """An adapter folder to continue: a peft method that adapts layers, the folder's own method, and
    no generic key or option beside it (the folder's adapter_config.json sets them)."""
    if p.adapter_path is None:
        return []
    import json
    from pathlib import Path

    key = "peft.adapter_path"
    if p.method in OWN_METHODS or is_prompt_learning(p.method):
        return [f"{key}: continues the adapter of a peft method that adapts layers (lora, dora, ia3, ...), "
                f"not peft.method {p.method}"]
    config_file = Path(p.adapter_path) / "adapter_config.json"
    if not config_file.is_file():
        return [f"{key}: {p.adapter_path} has no adapter_config.json (export the adapter run without --merge)"]
    try:
        saved = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        return [f"{key}: {config_file}:{err.lineno}: not valid JSON ({err.msg})"]
    saved_method = "dora" if saved.get("use_dora") else str(saved.get("peft_type", "")).lower()
    if saved_method != p.method:
        return [f"{key}: {p.adapter_path} holds a {saved_method or 'unknown'} adapter, but peft.method is {p.method}"]
    defaults = PeftConfig()
    fixed = [k for k in ("r", "alpha", "dropout", "target_modules", "num_virtual_tokens", "options")
             if getattr(p, k) != getattr(defaults, k)]
    return [f"peft.{k}: the adapter of peft.adapter_path keeps its own settings (its adapter_config.json); "
            "leave it unset" for k in fixed]


def _generic_problems(p: PeftConfig, defaults: PeftConfig, takes: set[str], method: str,
                      option_fields: list[str] = ()) -> list[str]:
    """The generic keys the method has no field for (their ranges are the schema's)."""
    problems = []
    for key in ("r", "alpha", "dropout", "target_modules", "num_virtual_tokens"):
        if key not in takes and getattr(p, key) != getattr(defaults, key):
            related = [name for name in option_fields
                       if name == key or any(word in name for word in _RELATED[key])]
            instead = f"; see peft.options ({', '.join(related)})" if related else "; leave it unset"
            problems.append(f"peft.{key}: peft.method {method} has no {_WHAT[key]}{instead}")
    return problems


# Words in the names of a method's own fields that do what a generic key it lacks would do.
_RELATED = {"r": ("rank", "block", "reduction", "_r"), "alpha": ("alpha", "scaling"), "dropout": ("dropout",),
            "target_modules": ("target",), "num_virtual_tokens": ("virtual", "adapter_len")}


def _option_problems(p: PeftConfig, config_cls, generic: dict[str, str]) -> list[str]:
    fields = [f.name for f in dataclasses.fields(config_cls)]
    problems = []
    by_field = {name: key for key, name in generic.items()}
    for key in p.options:
        if key in _RESERVED:
            problems.append(f"peft.options.{key}: {_RESERVED[key]}, not an option")
        elif key in by_field:
            problems.append(f"peft.options.{key}: set peft.{by_field[key]} instead")
        elif p.method == "dora" and key == "use_dora":
            problems.append("peft.options.use_dora: peft.method dora is LoRA with use_dora")
        elif key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(f"peft.options.{key}: not an option of peft's {config_cls.__name__} "
                            f"(peft.method {p.method}){hint}")
    return problems


def _gist(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _config_instance(p: PeftConfig, config_cls, generic: dict[str, str], task_type, total_steps: int,
                     target_modules):
    """The method's config from finetrain's keys and `peft.options`."""
    kwargs = {"task_type": task_type}
    for key, name in generic.items():
        if key == "target_modules":
            continue
        kwargs[name] = getattr(p, key)
    if "target_modules" in generic:
        targets = target_modules if target_modules is not None else p.target_modules
        if not (targets == "all-linear" and p.method in _NON_LINEAR_TARGETS):
            kwargs["target_modules"] = targets
    if p.method == "dora":
        kwargs["use_dora"] = True
    if p.method == "adalora":
        kwargs["total_step"] = max(1, total_steps)
        kwargs.setdefault("init_r", math.ceil(1.5 * p.r))  # AdaLoRA's own default: 12 for a target of 8
    if p.method == "prompt_tuning":
        import peft

        kwargs.setdefault("prompt_tuning_init", peft.PromptTuningInit.RANDOM)
    kwargs.update(p.options)
    return config_cls(**kwargs)


# --------------------------------------------------------------------------- wrapping


def apply_peft(model: nn.Module, cfg: PeftConfig, task: str, total_steps: int | None = None) -> nn.Module:
    """Wrap `model` so only the adapter (and, for classification, the new head) trains.
    Classification uses peft's SEQ_CLS task type, which keeps a trainable copy of the
    head (`score`/`classifier`) in modules_to_save: a frozen random head learns nothing.
    `total_steps`: the run's optimizer steps (AdaLoRA schedules its rank budget over them)."""
    if cfg.method == "bottleneck":

        return add_bottleneck_adapters(model, cfg, task)
    import peft
    from transformers.modeling_layers import GenericForSequenceClassification

    task_types = {"causal_lm": peft.TaskType.CAUSAL_LM, "sequence_classification": peft.TaskType.SEQ_CLS,
                  "reward_model": peft.TaskType.SEQ_CLS}
    if cfg.adapter_path:
        return continue_adapter(model, cfg.adapter_path)
    if prepends_virtual_tokens(cfg.method) and isinstance(model, GenericForSequenceClassification):
        raise ConfigError(
            f"peft.method {cfg.method}: {type(model).__name__} classifies from the last non-pad token, which it "
            "finds in input_ids; virtual tokens are fed as embeddings instead, so padded rows would be classified "
            "from a pad token. Use lora, dora, ia3 or prefix_tuning"
        )
    config_cls = peft_methods()[cfg.method]
    generic = _generic_fields(cfg.method, config_cls)
    targets = None
    if cfg.method == "ia3":
        targets = _linear_modules(model, cfg.target_modules)
    try:
        config = _config_instance(cfg, config_cls, generic, task_types[task], total_steps or 1, targets)
        if cfg.method == "ia3" and "feedforward_modules" not in cfg.options:
            config.feedforward_modules = set(_feedforward_modules(model, targets))
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError, RuntimeError) as err:
        raise ConfigError(f"peft.method {cfg.method}: cannot be applied to {type(model).__name__}: "
                          f"{_gist(err)[:300]}") from err


# The frozen copy of the adapter a run continues (peft.adapter_path), beside the trained "default".
REFERENCE_ADAPTER = "reference"


def continue_adapter(model: nn.Module, folder: str) -> nn.Module:
    """`model` with the adapter of `folder` to train on, and a frozen copy of it (REFERENCE_ADAPTER)
    that never trains: what the run started from, which preference tuning compares against
    (`reference_adapter`) instead of the bare base. Inactive, the copy costs its weights only."""
    import peft

    try:
        model = peft.PeftModel.from_pretrained(model, folder, is_trainable=True)
        model.load_adapter(folder, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as err:
        raise ConfigError(f"peft.adapter_path: {folder} cannot be loaded onto {type(model).__name__}: "
                          f"{_gist(err)[:300]}") from err
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name or name.endswith(f".{REFERENCE_ADAPTER}"):
            param.requires_grad_(False)
    return model


@contextlib.contextmanager
def reference_adapter(model: nn.Module):
    """Forward as preference tuning's reference model: the trained adapter switched off (the base),
    or, where the run continues an adapter, switched to the frozen copy of that adapter; which
    parameters require gradients is left as it is (peft's set_adapter would change it)."""
    model = getattr(model, "module", model)  # through a DDP or DeepSpeed wrapper
    if is_bottleneck_model(model):
        with adapters_switched_off(model):
            yield
        return
    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        with model.disable_adapter():
            yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    active = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = REFERENCE_ADAPTER
    try:
        yield
    finally:
        for layer, name in zip(layers, active):
            layer._active_adapter = name


def _linear_modules(model: nn.Module, target_modules: str | list) -> list[str]:
    """Full names of the linear layers `target_modules` selects (peft's rule: a name, or a
    suffix after a dot), or with "all-linear" every linear layer but the output head."""
    from torch import nn

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


# --------------------------------------------------------------------------- strategies


# Methods whose adapters peft cannot build on weights that are already partitioned as they load
# (a zero3 strategy loads model.path so, each rank holding a slice of every weight).
_NEED_WHOLE_WEIGHTS = {
    "loha": "peft sizes LoHa's factors from the shapes of the base weights",
    "ln_tuning": "peft copies the norm layers it trains, partitioned weights and all",
}


def strategy_needs(cfg: Config) -> list[tuple[str, str, str]]:
    """What the peft method asks of the parallel strategy, as (capability, key, why); each
    strategy declares what it supports (trainer/parallel/strategy.py), the plan refuses the rest."""

    method, needs = cfg.peft.method, []
    if method == "adalora":
        needs.append((WHOLE_GRADIENTS, "peft.method adalora", "after every optimizer step AdaLoRA re-allocates its "
                      "rank budget from each adapter weight's whole gradient"))
    if method in _NEED_WHOLE_WEIGHTS and cfg.model.path is not None:
        needs.append((WHOLE_BASE_WEIGHTS, f"peft.method {method}", _NEED_WHOLE_WEIGHTS[method]))
    return needs


# --------------------------------------------------------------------------- training hooks


def _adalora(model: nn.Module):
    """The AdaLoRA tuner of `model` (through a DDP/DeepSpeed wrapper), or None."""
    model = getattr(model, "module", model)
    base = getattr(model, "base_model", None)
    return base if type(base).__name__ == "AdaLoraModel" else None


def adapter_regularizer(model: nn.Module) -> torch.Tensor | None:
    """A penalty the method adds to the training loss, or None: AdaLoRA's orthogonality term,
    orth_reg_weight times the mean over its P (lora_A) and Q (lora_B) matrices of
    ||P P^T - I||_F (and ||Q^T Q - I||_F), which keeps them near the singular vectors its
    rank allocation assumes."""
    import torch

    tuner = _adalora(model)
    if tuner is None or not torch.is_grad_enabled():
        return None
    config = tuner.peft_config[tuner.trainable_adapter_name]
    if config.orth_reg_weight == 0:
        return None
    terms = []
    for name, param in tuner.model.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and name.endswith(f".{tuner.trainable_adapter_name}"):
            gram = param @ param.T if ".lora_A." in name else param.T @ param
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)))
    if not terms:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean().float()


def with_adapter_penalty(model: nn.Module, summed_loss: torch.Tensor, targets: int) -> torch.Tensor:
    """A micro-batch's summed training loss plus the penalty the method adds (AdaLoRA's), once per
    optimizer step: each micro-batch adds it times its own `targets`, which the loop's division
    by the step's global target count turns into the penalty itself."""
    penalty = adapter_regularizer(model)
    return summed_loss if penalty is None else summed_loss + penalty * targets


def after_optimizer_step(model: nn.Module, step: int) -> None:
    """What the method does between the optimizer step and zeroing the gradients (`step`:
    0-based index of the step just taken): AdaLoRA updates its importance scores and masks
    the singular values over its budget."""
    tuner = _adalora(model)
    if tuner is not None:
        tuner.update_and_allocate(step)


def adapter_training_state(model: nn.Module) -> dict | None:
    """Training state of the method outside parameters and optimizer (for checkpoints):
    AdaLoRA's importance averages and rank pattern. The same on every rank (ddp)."""
    tuner = _adalora(model)
    if tuner is None:
        return None
    allocator = tuner.rankallocator
    config = tuner.peft_config[tuner.trainable_adapter_name]
    return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": config.rank_pattern}


def load_adapter_training_state(model: nn.Module, state: dict | None) -> None:
    tuner = _adalora(model)
    if tuner is None or state is None:
        return
    allocator = tuner.rankallocator
    allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]


# --------------------------------------------------------------------------- export


_BOTTLENECK_MERGE = (
    "merge: bottleneck adapters are layers of their own (down-projection, nonlinearity, up-projection) between the "
    "frozen blocks; the nonlinearity cannot be folded into the base weights, so they add latency by design. Export "
    "without --merge: the adapter folder loads onto the base with trainer.peft.bottleneck.load_bottleneck_adapters")


def merge_problem(method: str) -> str | None:
    """Why the adapter of `method` cannot be merged into the base weights, or None."""
    if method == "none":
        return "merge: the model has no adapter to merge (peft.method is none)"
    if method == "bottleneck":
        return _BOTTLENECK_MERGE
    if is_prompt_learning(method):
        return (f"merge: peft.method {method} cannot be merged: its virtual tokens are extra inputs, not weight "
                "changes; export the adapter (without --merge) and load it with peft")
    if method in _UNMERGEABLE:
        return (f"merge: peft.method {method} has no merge in peft (its adapter is not a weight change); "
                "export the adapter (without --merge) and load it with peft")
    return None


def merge_adapter(model: nn.Module) -> nn.Module:
    """The plain transformers model with the adapter folded into its weights."""

    if is_bottleneck_model(model):
        raise UserError(_BOTTLENECK_MERGE)
    if not is_peft_model(model):
        raise UserError(merge_problem("none"))
    method = model.active_peft_config.peft_type.value.lower()
    problem = merge_problem(method)
    if problem:
        raise UserError(problem)
    try:
        return model.merge_and_unload()
    except (NotImplementedError, ValueError, AttributeError) as err:
        raise UserError(f"merge: peft cannot merge peft.method {method}: {_gist(err)}; export the adapter "
                        "(without --merge) and load it with peft") from err


def trained_adapters(model: nn.Module) -> list[str]:
    """The names of a peft model's adapters that training changes (not the frozen reference copy)."""
    return [name for name in model.peft_config if name != REFERENCE_ADAPTER]


def is_peft_model(model: nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def has_adapter(model: nn.Module) -> bool:
    """A peft adapter or finetrain's bottleneck adapters."""

    return is_peft_model(model) or is_bottleneck_model(model)
