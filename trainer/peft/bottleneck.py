"""Bottleneck adapter modules (Houlsby et al., 2019): `peft.method: bottleneck`.

A small network, down-projection -> nonlinearity -> up-projection, with a residual around
it, after the attention block and/or the MLP block of every transformer layer; the base
model stays frozen and only the adapters (and a classification head) train. The up-projection
starts at zero, so an adapted model computes exactly what its base computes until the first
update.

An adapter sits on the output projection of its block (Llama `self_attn.o_proj` and
`mlp.down_proj`, BERT `attention.output.dense` and `output.dense`): a child module of that
linear layer, applied to its output by a forward hook, before the block's residual addition
(and, in BERT, its LayerNorm), where Houlsby places it. The base model's modules and
state-dict keys stay as they are, so a pretrained checkpoint loads as usual, and every
strategy shards, gathers and checkpoints the adapters with the decoder layer they belong to.

Unlike LoRA, an adapter cannot be folded into the base weights (the nonlinearity sits between
its two projections): it adds two small matmuls per block at inference, by design. Exported,
it is a folder of its own (`bottleneck_config.json`, `bottleneck_model.safetensors`) that
`load_bottleneck_adapters` puts onto the base model.
"""

from __future__ import annotations

import contextlib
import difflib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from trainer.model.structure import decoder_layers
from trainer.runtime.errors import ConfigError, UserError

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_model.safetensors"
ADAPTER = "bottleneck_adapter"  # the child module's name under the adapted linear layer
PLACEMENTS = ("attention", "mlp")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}
HEADS = ("score", "classifier")  # classification heads, trained with the adapters


@dataclass
class BottleneckOptions:
    """`peft.options` of peft.method bottleneck."""

    reduction_factor: float = 16.0  # bottleneck width = hidden size / reduction_factor
    placement: list = field(default_factory=lambda: list(PLACEMENTS))  # after attention and/or mlp
    activation: str = "gelu"


def bottleneck_options(options: dict) -> BottleneckOptions:
    """The options as a BottleneckOptions; ConfigError naming the first wrong key."""
    problems = _option_problems(options)
    if problems:
        raise ConfigError("\n".join(problems))
    values = dict(options)
    if isinstance(values.get("placement"), str):
        values["placement"] = list(PLACEMENTS) if values["placement"] == "both" else [values["placement"]]
    if "reduction_factor" in values:
        values["reduction_factor"] = float(values["reduction_factor"])
    return BottleneckOptions(**values)


def _option_problems(options: dict) -> list[str]:
    known = [f.name for f in fields(BottleneckOptions)]
    problems = []
    for key, value in options.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else f"; bottleneck takes {', '.join(known)}"
            problems.append(f"peft.options.{key}: not an option of bottleneck adapters{hint}")
        elif key == "reduction_factor" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                            or value <= 0):
            problems.append(f"peft.options.reduction_factor: a number > 0 (hidden size / bottleneck width), "
                            f"got {value!r}")
        elif key == "placement":
            chosen = ([value] if value != "both" else list(PLACEMENTS)) if isinstance(value, str) else value
            if (not isinstance(chosen, list) or not chosen or not all(isinstance(p, str) for p in chosen)
                    or set(chosen) - set(PLACEMENTS) or len(set(chosen)) != len(chosen)):
                problems.append(f"peft.options.placement: attention, mlp, both, or a list of attention and mlp; "
                                f"got {value!r}")
        elif key == "activation" and value not in ACTIVATIONS:
            problems.append(f"peft.options.activation: one of {', '.join(ACTIVATIONS)}, got {value!r}")
    return problems


def bottleneck_problems(peft_cfg, task: str) -> list[str]:
    """What is wrong with the keys of peft.method bottleneck (for config validation)."""
    return _option_problems(peft_cfg.options)


# --------------------------------------------------------------------------- the module


class BottleneckAdapter(nn.Module):
    """h -> h + up(act(down(dropout(h)))); `up` starts at zero, so it starts as the identity."""

    def __init__(self, hidden: int, width: int, activation: str, dropout: float, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.down = nn.Linear(hidden, width, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout)
        if device.type != "meta":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(self.dropout(hidden))))


def _apply_adapter(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted linear layer: its output through its adapter (unless switched off)."""
    if getattr(module, SWITCHED_OFF, False):
        return output
    return getattr(module, ADAPTER)(output)


SWITCHED_OFF = "bottleneck_adapter_off"  # set on an adapted linear layer while its adapter is switched off


@contextlib.contextmanager
def adapters_switched_off(model: nn.Module):
    """The model computing as its base does (preference tuning's reference): every adapter skipped."""
    sites = [module for module in model.modules() if hasattr(module, ADAPTER)]
    for module in sites:
        setattr(module, SWITCHED_OFF, True)
    try:
        yield
    finally:
        for module in sites:
            setattr(module, SWITCHED_OFF, False)


# --------------------------------------------------------------------------- placing adapters


def adapter_sites(model: nn.Module, placement: list[str]) -> list[str]:
    """Names of the linear layers whose outputs get an adapter: per transformer layer, the
    last linear layer of its attention block that maps to the hidden size (the attention
    output projection), and the one linear layer outside attention that does (the MLP's
    down-projection)."""

    hidden = _hidden_size(model)
    names = {id(module): name for name, module in model.named_modules()}
    sites = []
    for index, layer in enumerate(decoder_layers(model)):
        prefix = names[id(layer)]
        attention = [name for name, _ in layer.named_children() if "attn" in name.lower() or "attention" in name.lower()]
        to_hidden = [(name, m) for name, m in layer.named_modules()
                     if isinstance(m, nn.Linear) and m.out_features == hidden and ADAPTER not in name]
        in_attention = [name for name, _ in to_hidden if name.split(".")[0] in attention]
        outside = [name for name, _ in to_hidden if name.split(".")[0] not in attention]
        kind = type(layer).__name__
        if "attention" in placement:
            if not in_attention:
                raise ConfigError(f"peft.options.placement: attention, but layer {index} ({kind}) has no attention "
                                  f"block with a linear output projection to the hidden size {hidden}")
            sites.append(f"{prefix}.{in_attention[-1]}")
        if "mlp" in placement:
            if len(outside) != 1:
                found = ", ".join(outside) or "none"
                raise ConfigError(f"peft.options.placement: mlp, but layer {index} ({kind}) has not exactly one linear "
                                  f"layer outside attention mapping to the hidden size {hidden} (found: {found}); "
                                  "use placement attention")
            sites.append(f"{prefix}.{outside[0]}")
    return sites


def _hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def add_bottleneck_adapters(model: nn.Module, peft_cfg, task: str) -> nn.Module:
    """Freeze `model` and put a bottleneck adapter after the attention and/or MLP block of
    each of its layers (in place; returns it). With sequence classification the new head
    trains too."""
    options = bottleneck_options(peft_cfg.options)
    return _attach(model, options, peft_cfg.dropout, task)


def _attach(model: nn.Module, options: BottleneckOptions, dropout: float, task: str) -> nn.Module:
    if is_bottleneck_model(model):
        raise UserError(f"{type(model).__name__} already has bottleneck adapters")
    hidden = _hidden_size(model)
    width = max(1, round(hidden / options.reduction_factor))
    reference = model.get_input_embeddings().weight
    modules = dict(model.named_modules())
    sites = adapter_sites(model, options.placement)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in sites:
        linear = modules[name]
        linear.add_module(ADAPTER, BottleneckAdapter(hidden, width, options.activation, dropout, reference.dtype,
                                                     reference.device))
        linear.register_forward_hook(_apply_adapter)
    heads = []
    if task in ("sequence_classification", "reward_model"):
        heads = [name for name in HEADS if isinstance(getattr(model, name, None), nn.Module)]
        for name in heads:
            getattr(model, name).requires_grad_(True)
    model.bottleneck_adapters = {"method": "bottleneck", **asdict(options), "dropout": dropout, "hidden_size": hidden,
                                 "bottleneck_size": width, "modules": sites, "heads": heads, "task": task,
                                 "model_type": getattr(model.config, "model_type", None)}
    return model


def is_bottleneck_model(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a DDP / DeepSpeed wrapper) carries bottleneck adapters."""
    return hasattr(getattr(model, "module", model), "bottleneck_adapters")


# --------------------------------------------------------------------------- saving and loading


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of the adapters (and the classification head), by model key."""
    info = model.bottleneck_adapters
    prefixes = tuple(f"{site}.{ADAPTER}." for site in info["modules"]) + tuple(f"{head}." for head in info["heads"])
    return {key: value for key, value in model.state_dict().items() if key.startswith(prefixes)}


def save_bottleneck_adapters(model: nn.Module, folder: str | Path) -> Path:
    """Write the adapter folder: its config (options, sizes, the adapted modules, the base
    model) and its weights as safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = dict(model.bottleneck_adapters, base_model_name_or_path=getattr(model.config, "_name_or_path", None))
    (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    state = {key: value.detach().contiguous().cpu() for key, value in adapter_state_dict(model).items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def load_bottleneck_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the adapters saved in `folder` onto `model`, a plain transformers model of the
    same architecture (in place; returns it). The adapters are placed where they were
    trained, and every weight of the folder must find its place."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder}: not a bottleneck adapter folder (no {CONFIG_FILE})")
    info = json.loads((folder / CONFIG_FILE).read_text())
    options = BottleneckOptions(reduction_factor=info["reduction_factor"], placement=info["placement"],
                                activation=info["activation"])
    if _hidden_size(model) != info["hidden_size"]:
        raise UserError(f"{folder}: adapters of hidden size {info['hidden_size']}, but {type(model).__name__} has "
                        f"{_hidden_size(model)}")
    _attach(model, options, info["dropout"], info["task"])
    if model.bottleneck_adapters["modules"] != info["modules"]:
        raise UserError(f"{folder}: the adapters were trained on {info['modules'][:2]}..., which "
                        f"{type(model).__name__} places at {model.bottleneck_adapters['modules'][:2]}...")
    state = load_file(str(folder / WEIGHTS_FILE))
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"{folder}: weights do not match the adapters (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False)
    return model
