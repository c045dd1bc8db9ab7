"""Per-device memory before launch: parameters, gradients, optimizer state, activations.

The model is built on the meta device (no memory, seconds even for 8B), so every
count is the real architecture's, peft wrapper included. Activations are measured
too, not guessed: one micro-batch (train.micro_batch_size x data.seq_len) runs
forward on meta tensors while a saved-tensors hook adds up what autograd keeps for
backward, with attention standing in as FlashAttention does (it keeps q, k, v, the
output and the log-sum-exp, never the seq_len^2 scores).

What each strategy keeps per device (parameters, gradients, optimizer state, what offload
moves to the host) is the strategy's own accounting, next to its code (`memory` of each
class in trainer/parallel/); with `model.quantization: nf4` the frozen linear weights take
about 0.52 bytes each instead of the master dtype's (trainer/quantization.py).

`resident_state_bytes` measures the same quantities on a live strategy, which is
how the tests hold this estimate to the real thing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from trainer.config import Config
from trainer.errors import ConfigError, UserError
from trainer.quantization import is_quantized_weight, nf4_bytes, quant_state_bytes, quantize_skeleton

META_ATTENTION = "finetrain_meta"
ADAM_MOMENTS = 2


@dataclasses.dataclass
class Unit:
    """Parameter elements of one sharding unit (all, those that train, those held in 4-bit)."""

    total: int = 0
    trainable: int = 0
    quantized: int = 0

    @classmethod
    def of(cls, modules: list) -> "Unit":
        params = {id(p): p for module in modules for p in module.parameters()}.values()
        return cls(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
                   sum(p.numel() for p in params if is_quantized_weight(p)))


@dataclasses.dataclass
class ModelShape:
    """Parameter counts (elements) of the model as built for training, by FSDP unit."""

    total: int
    trainable: int
    layer: Unit  # the largest decoder layer
    layers: int
    embedding: Unit  # a unit of its own when untied from the head, else empty
    head: Unit
    root: Unit  # everything else (final norm, tied embeddings, prompt encoders)
    hidden_size: int
    numels: list  # of every parameter, for ZeRO's per-parameter partitioning
    trainable_numels: list
    quantized_numels: list  # of every 4-bit weight (model.quantization)


@dataclasses.dataclass
class ActivationShape:
    """Bytes autograd keeps for one micro-batch, split by where they are saved."""

    in_layers: int  # all decoder layers together
    outside: int  # embeddings, final norm, head, loss
    layer_input: int  # one layer's input (what activation checkpointing keeps instead)
    logits: int  # the full logits, alive until the loss backward (fused head: its transient peak)


# ------------------------------------------------------------------------------ model


def model_config(cfg: Config):
    """The model's transformers config, read from `model.path`'s config.json alone (weights,
    data and checkpoints may only exist on the cluster) or `model.config`."""
    from trainer.config import cache_root
    from trainer.models import model_config as training_model_config, resolve_model_path

    if cfg.model.path and not (Path(resolve_model_path(cfg.model.path, cache_root(cfg))) / "config.json").is_file():
        raise ConfigError(f"model.path: {cfg.model.path} has no config.json (the one file the estimate reads: "
                          "copy it there, or point model.path at a folder that has it)")
    return training_model_config(cfg)


def meta_model(cfg: Config, dtype: torch.dtype, quantize: bool = True) -> nn.Module:
    """The training model (peft included) with every tensor on the meta device; with
    `model.quantization` (and `quantize`) its linear layers are the 4-bit ones loading makes."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from trainer.fused_loss import install_fused_head
    from trainer.peft import apply_peft

    _register_meta_attention()
    auto = AutoModelForCausalLM if cfg.model.task == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(model_config(cfg), dtype=dtype, attn_implementation=META_ATTENTION)
        if quantize and cfg.model.quantization != "none":
            quantize_skeleton(model, cfg)
        if cfg.peft.method != "none":
            model = apply_peft(model, cfg.peft, cfg.model.task, cfg.train.max_steps)
    install_fused_head(model, cfg)
    return model


def model_shape(model: nn.Module) -> ModelShape:
    from trainer.models import decoder_layers
    from trainer.parallel.fsdp import separate_embeddings

    layers = decoder_layers(model)
    embedding, head = separate_embeddings(model)
    units = [*layers, *(m for m in (embedding, head) if m is not None)]
    in_units = {id(p) for unit in units for p in unit.parameters()}
    params = list(model.parameters())  # tied weights once
    root = [p for p in params if id(p) not in in_units]
    return ModelShape(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        layer=max((Unit.of([layer]) for layer in layers), key=lambda u: u.total),
        layers=len(layers),
        embedding=Unit.of([embedding] if embedding is not None else []),
        head=Unit.of([head] if head is not None else []),
        root=Unit(sum(p.numel() for p in root), sum(p.numel() for p in root if p.requires_grad)),
        hidden_size=getattr(getattr(model, "config", None), "hidden_size", 0),
        numels=[p.numel() for p in params],
        trainable_numels=[p.numel() for p in params if p.requires_grad],
        quantized_numels=[p.numel() for p in params if is_quantized_weight(p)],
    )


# -------------------------------------------------------------------------- activations


class _FlashLikeAttention(torch.autograd.Function):
    """What FlashAttention keeps for backward: q, k, v, output and log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the meta attention only measures memory")


def _meta_attention(module, query, key, value, attention_mask, **kwargs):
    return _FlashLikeAttention.apply(query, key, value).transpose(1, 2), None


def _register_meta_attention() -> None:
    """Registered without a mask function, so transformers builds no mask (none is needed
    to count memory, and building one would read values of meta tensors)."""
    from transformers import AttentionInterface

    AttentionInterface.register(META_ATTENTION, _meta_attention)


@contextlib.contextmanager
def saved_tensor_bytes(model: nn.Module, layers: list[nn.Module]):
    """Count the bytes autograd saves for backward (parameters excluded), split into
    inside the decoder layers and outside; yields the running totals."""
    totals = {"in_layers": 0, "outside": 0}
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
    meta_params = {id(p) for p in model.parameters()}
    seen: set = set()
    alive: list = []  # keeps every counted meta tensor alive, so no id() is reused for another
    depth = [0]

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1

    def pack(tensor):
        if isinstance(tensor, nn.Parameter) or id(tensor) in meta_params:
            return tensor
        if tensor.device.type == "meta":
            # Meta tensors have no storage to compare: a view is counted as the tensor it views.
            base = tensor if tensor._base is None else tensor._base
            alive.append(base)
            key, size = ("meta", id(base)), base.numel() * base.element_size()
        else:
            key, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
            if key in param_storages:
                return tensor
        if key not in seen:
            seen.add(key)
            totals["in_layers" if depth[0] else "outside"] += size
        return tensor

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield totals
    finally:
        for handle in handles:
            handle.remove()


def activation_shape(cfg: Config, compute_dtype: torch.dtype) -> ActivationShape:
    """Forward one micro-batch on meta tensors through the loop's loss path and count what
    autograd keeps. Every position but a row's first is a target: an upper bound for the
    fused head, which skips prompts and padding. bitsandbytes' 4-bit matmul cannot run on
    meta tensors, so a 4-bit base is measured unquantized: the input it keeps for backward
    is the one an adapter on the same layer keeps anyway."""
    from trainer.fused_loss import fused_head, transient_bytes
    from trainer.loss import forward_summed_loss
    from trainer.models import decoder_layers

    model = meta_model(cfg, compute_dtype, quantize=False)
    model.train()
    head = fused_head(model)
    rows, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    ids = torch.zeros(rows, seq, dtype=torch.long, device="meta")
    classification = cfg.model.task == "sequence_classification"
    labels = torch.zeros(rows if classification else (rows, seq), dtype=torch.long)
    # The fused head picks its target positions from the labels' values, so they are real.
    labels = labels if head is not None else labels.to("meta")
    with saved_tensor_bytes(model, decoder_layers(model)) as totals:
        forward_summed_loss(model, {"input_ids": ids}, labels, cfg.model.task)
    hidden = getattr(model.config, "hidden_size", 0)
    element = torch.empty((), dtype=compute_dtype).element_size()
    outputs = cfg.model.num_labels if classification else model.config.vocab_size
    return ActivationShape(
        in_layers=totals["in_layers"],
        outside=totals["outside"],
        layer_input=rows * seq * hidden * element,
        logits=transient_bytes(head, rows * (seq - 1), compute_dtype) if head is not None
        else rows * (1 if classification else seq) * outputs * element,
    )


def activation_bytes(acts: ActivationShape, layers: int, checkpointing: bool) -> int:
    """Peak activations of one micro-batch; with checkpointing each layer keeps only its
    input, and one layer's activations come back at a time during backward."""
    if not checkpointing:
        return acts.in_layers + acts.outside + acts.logits
    return layers * acts.layer_input + acts.in_layers // max(layers, 1) + acts.outside + acts.logits


# ----------------------------------------------------------------------------- strategies


@dataclasses.dataclass
class ElementSizes:
    """Bytes per element of the master weights and of compute, and the 4-bit part of a model:
    its elements, their packed bytes (half a byte each) and their quantization constants
    (per-block scales, lookup tables, kept whole on every rank)."""

    master: int
    compute: int
    quantized: int
    packed: int
    constants: int


def element_sizes(shape: ModelShape, cfg: Config) -> ElementSizes:
    master = torch.empty((), dtype=getattr(torch, cfg.model.dtype)).element_size()
    packed = sum(math.ceil(n / 2) for n in shape.quantized_numels)
    return ElementSizes(master=master, compute=2 if cfg.parallel.mixed_precision == "bf16" else master,
                        quantized=sum(shape.quantized_numels), packed=packed,
                        constants=sum(nf4_bytes(n) for n in shape.quantized_numels) - packed)


def strategy_memory(name: str, shape: ModelShape, acts: int, cfg: Config, world: int) -> dict:
    """Per-device bytes under strategy `name` on `world` devices: its own accounting
    (trainer/parallel/), plus the activations of one micro-batch and, with asynchronous
    checkpoints, the host copy of the rank's saved state that they keep for the whole run."""
    from trainer.parallel import strategy_class
    from trainer.parallel.base import ASYNC_SAVE

    cls = strategy_class(name)
    row = cls.memory(name, shape, acts, cfg, world)
    saved = row.pop("saved")
    if cfg.checkpoint.async_ and ASYNC_SAVE in cls.supports:
        row["host"] += saved
    row["activations"] = acts
    row["total"] = row["params"] + row["grads"] + row["optimizer"] + row["activations"]
    return row


def estimate_memory(cfg: Config, nodes: int, gpus_per_node: int) -> list[dict]:
    """One row per strategy: per-device bytes of params, grads, optimizer state and
    activations (plus host bytes under offload); `note` says why a strategy cannot run."""
    from trainer.parallel import strategy_names, strategy_problems

    world = nodes * gpus_per_node
    if world < 1:
        raise UserError(f"estimate: --nodes {nodes} x --gpus-per-node {gpus_per_node} is no device")
    master = getattr(torch, cfg.model.dtype)
    compute = torch.bfloat16 if cfg.parallel.mixed_precision == "bf16" else master
    shape = model_shape(meta_model(cfg, master))
    acts = activation_bytes(activation_shape(cfg, compute), shape.layers, cfg.parallel.activation_checkpointing)
    rows = []
    for name in strategy_names():
        probe = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, strategy=name))
        note = "; ".join(strategy_problems(probe, name, world))
        rows.append({"strategy": name, "devices": world, "trainable": shape.trainable, "parameters": shape.total,
                     **strategy_memory(name, shape, acts, probe, world), "note": note})
    return rows


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_table(rows: list[dict]) -> str:
    """A markdown table, one row per strategy; strategies that cannot run say why below it."""
    if not rows:
        return ""
    first = rows[0]
    lines = [f"{first['parameters']:,} parameters ({first['trainable']:,} trainable) on {first['devices']} device(s); "
             "memory per device",
             "",
             "| strategy | params | grads | optimizer | activations | total | host (offload, async save) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for row in rows:
        cells = [format_bytes(row[k]) for k in ("params", "grads", "optimizer", "activations", "total", "host")]
        if row["note"]:
            cells = ["—"] * len(cells)
            notes.append(f"- {row['strategy']}: {row['note']}")
        lines.append(f"| {row['strategy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


# ------------------------------------------------------------------------ measurement


def resident_state_bytes(strategy) -> dict:
    """Bytes this rank actually holds: its parameters (local shards; ZeRO-3 partitions)
    and its optimizer state (moments, plus DeepSpeed's fp32 master copies)."""
    def local(tensor):
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    seen: set = set()

    def size(tensor) -> int:
        tensor = local(tensor)
        key = tensor.untyped_storage().data_ptr()
        if key in seen or tensor.numel() == 0:
            return 0
        seen.add(key)
        return tensor.untyped_storage().nbytes()

    model = strategy.unwrapped_model()
    params = quant_state_bytes(model)  # 4-bit weights' scales and lookup tables: not parameters
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):  # a ZeRO-3 partition; small parameters also stay whole
            params += size(param.ds_tensor) + (size(param.data) if getattr(param, "ds_persist", False) else 0)
        else:
            params += size(param)
    inner = getattr(strategy.optimizer, "optimizer", strategy.optimizer)  # DeepSpeed wraps the client optimizer
    optimizer = sum(size(p) for group in inner.param_groups for p in group["params"])  # master copies, if separate
    for state in inner.state.values():
        optimizer += sum(size(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "optimizer": optimizer}


def peak_resident_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

