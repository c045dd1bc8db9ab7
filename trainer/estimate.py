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

Long context: with `parallel.sequence_parallel` N each rank computes seq_len/N tokens of every
row (attention on all of them but with 1/N of the heads, the same bytes), so the activations are
measured on a micro-batch of seq_len/N tokens; with `train.activation_offload` what autograd
saves waits in host memory and the device keeps what backward works on (`activation_placement`).
Activations grow linearly with seq_len (attention keeps no seq_len^2 scores), so
`longest_seq_len` measures them at two lengths and solves for the longest that fits a device.

`resident_state_bytes` measures the same quantities on a live strategy, which is
how the tests hold this estimate to the real thing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
    # sequence parallelism: this rank's tokens of each row (its attention: all of them, 1/N of the heads)
    rows, seq = cfg.train.micro_batch_size, cfg.data.seq_len // cfg.parallel.sequence_parallel
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


def activation_placement(acts: ActivationShape, layers: int, checkpointing: bool, offload: bool) -> tuple[int, int]:
    """(device, host) bytes of one micro-batch's activations. Offloaded (trainer/activation_offload.py),
    what forward saves waits in host memory; the device holds what backward works on: one layer's
    saved tensors (recomputed, under checkpointing) and the next ones coming back, counted as one
    more layer's (or its input, under checkpointing), and the loss head's transient."""
    if not offload:
        return activation_bytes(acts, layers, checkpointing), 0
    per_layer = acts.in_layers // max(layers, 1)
    if checkpointing:
        return per_layer + acts.layer_input + acts.logits, layers * acts.layer_input + acts.outside
    return 2 * per_layer + acts.logits, acts.in_layers + acts.outside


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

    from trainer.plan import sequence_problems

    world = nodes * gpus_per_node
    if world < 1:
        raise UserError(f"estimate: --nodes {nodes} x --gpus-per-node {gpus_per_node} is no device")
    shape = model_shape(meta_model(cfg, master_dtype(cfg)))
    device_acts, host_acts = activations(cfg, shape)
    rows = []
    for name in strategy_names():
        probe = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, strategy=name))
        note = "; ".join(strategy_problems(probe, name, world) + sequence_problems(probe, world, None))
        row = strategy_memory(name, shape, device_acts, probe, world)
        row["host"] += host_acts
        rows.append({"strategy": name, "devices": world, "trainable": shape.trainable, "parameters": shape.total,
                     "seq_len": cfg.data.seq_len, "sequence_parallel": cfg.parallel.sequence_parallel,
                     "activations_host": host_acts, **row, "note": note})
    return rows


def master_dtype(cfg: Config) -> torch.dtype:
    return getattr(torch, cfg.model.dtype)


def activations(cfg: Config, shape: ModelShape) -> tuple[int, int]:
    """(device, host) bytes of one micro-batch's activations per rank at `data.seq_len`."""
    compute = torch.bfloat16 if cfg.parallel.mixed_precision == "bf16" else master_dtype(cfg)
    return activation_placement(activation_shape(cfg, compute), shape.layers, cfg.parallel.activation_checkpointing,
                                cfg.train.activation_offload)


# Of a device's memory, what the estimate lets a run fill: the rest goes to the CUDA context,
# NCCL's buffers and the caching allocator's fragmentation.
USABLE_FRACTION = 0.9


def longest_seq_len(cfg: Config, nodes: int, gpus_per_node: int, device_bytes: float,
                    host_bytes_per_node: float | None = None) -> list[dict]:
    """Per strategy, the longest `data.seq_len` (a multiple of 1024 and of the sequence-parallel
    size) whose per-device total fits USABLE_FRACTION of `device_bytes` (and, when given, whose
    host memory fits the node's): activations are linear in seq_len, so they are measured at two
    lengths and the line is solved, then the answer is measured once more to confirm it."""
    n = cfg.parallel.sequence_parallel
    step = 1024 * n // math.gcd(1024, n)
    shape = model_shape(meta_model(cfg, master_dtype(cfg)))

    @functools.cache
    def at(seq_len: int) -> tuple[int, int]:
        return activations(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len)), shape)

    first, second = 4 * step, 8 * step
    (d1, h1), (d2, h2) = at(first), at(second)
    per_token = ((d2 - d1) / (second - first), (h2 - h1) / (second - first))
    budget = USABLE_FRACTION * device_bytes
    rows = []
    for row in estimate_memory(cfg, nodes, gpus_per_node):
        found = dict(row, longest=None)
        if not row["note"]:
            state = row["total"] - row["activations"]
            host_state = row["host"] - row["activations_host"]
            limits = [(budget - state - (d1 - per_token[0] * first)) / per_token[0]]
            if host_bytes_per_node:
                per_device = host_bytes_per_node / gpus_per_node
                limits.append((per_device - host_state - (h1 - per_token[1] * first)) / max(per_token[1], 1e-9))
            seq_len = int(min(limits) // step * step)
            while seq_len >= step:  # confirmed by measuring there (the line is a straight one, nearly)
                device, host = at(seq_len)
                fits = state + device <= budget and (not host_bytes_per_node or
                                                     host_state + host <= host_bytes_per_node / gpus_per_node)
                if fits:
                    found.update(longest=seq_len, tokens_per_rank=seq_len // n, activations=device,
                                 activations_host=host, total=state + device, host=host_state + host)
                    break
                seq_len = int(seq_len * 0.95 // step * step)
            if found["longest"] is None:
                found["note"] = f"even seq_len {step} does not fit {format_bytes(budget)} per device"
        rows.append(found)
    return rows


def format_longest(rows: list[dict], device_bytes: float, host_bytes_per_node: float | None) -> str:
    first = rows[0]
    host = f", host memory {format_bytes(host_bytes_per_node)} per node" if host_bytes_per_node else ""
    lines = [f"{first['parameters']:,} parameters ({first['trainable']:,} trainable) on {first['devices']} device(s) "
             f"of {format_bytes(device_bytes)} ({USABLE_FRACTION:.0%} usable){host}; "
             f"parallel.sequence_parallel {first['sequence_parallel']}",
             "",
             "| strategy | longest seq_len | tokens per rank | activations | total per device | host per device |",
             "|---|---:|---:|---:|---:|---:|"]
    notes = []
    for row in rows:
        if row["longest"] is None:
            lines.append(f"| {row['strategy']} | — | — | — | — | — |")
            notes.append(f"- {row['strategy']}: {row['note']}")
            continue
        lines.append(f"| {row['strategy']} | {row['longest']:,} | {row['tokens_per_rank']:,} | "
                     f"{format_bytes(row['activations'])} | {format_bytes(row['total'])} | {format_bytes(row['host'])} |")
    return "\n".join(lines + ([""] + notes if notes else []))


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
    sequence = f"; {first['seq_len'] // first['sequence_parallel']:,} tokens per rank of each row of " \
        f"{first['seq_len']:,} (parallel.sequence_parallel {first['sequence_parallel']})" \
        if first["sequence_parallel"] > 1 else ""
    lines = [f"{first['parameters']:,} parameters ({first['trainable']:,} trainable) on {first['devices']} device(s); "
             f"memory per device{sequence}",
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

