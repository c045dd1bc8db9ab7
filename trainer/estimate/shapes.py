"""The model and its activations as the estimate sees them: the model built on the meta
device (no memory, seconds even for 8B, peft wrapper included), its parameter counts per
unit of sharding, and the bytes one micro-batch saves for backward, measured."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from trainer.config.schema import Config, cache_root
from trainer.model.loading import model_config, resolve_model_path
from trainer.model.loss import forward_summed_loss
from trainer.model.loss_head import fused_head, install_fused_head, transient_bytes
from trainer.model.quantization import is_quantized_weight, nf4_bytes, quantize_skeleton
from trainer.model.structure import decoder_layers
from trainer.parallel.fsdp import separate_embeddings
from trainer.peft.methods import apply_peft
from trainer.runtime.errors import ConfigError
from trainer.runtime.precision import compute_dtype

META_ATTENTION = "finetrain_meta"



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



def architecture_config(cfg: Config):
    """The model's transformers config, read from `model.path`'s config.json alone (weights,
    data and checkpoints may only exist on the cluster) or `model.config`."""

    if cfg.model.path and not (Path(resolve_model_path(cfg.model.path, cache_root(cfg))) / "config.json").is_file():
        raise ConfigError(f"model.path: {cfg.model.path} has no config.json (the one file the estimate reads: "
                          "copy it there, or point model.path at a folder that has it)")
    return model_config(cfg)



def meta_model(cfg: Config, dtype: torch.dtype, quantize: bool = True) -> nn.Module:
    """The training model (peft included) with every tensor on the meta device; with
    `model.quantization` (and `quantize`) its linear layers are the 4-bit ones loading makes."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


    _register_meta_attention()
    auto = AutoModelForCausalLM if cfg.model.task == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(architecture_config(cfg), dtype=dtype, attn_implementation=META_ATTENTION)
        if quantize and cfg.model.quantization != "none":
            quantize_skeleton(model, cfg)
        if cfg.peft.method != "none":
            model = apply_peft(model, cfg.peft, cfg.model.task, cfg.train.max_steps)
    install_fused_head(model, cfg)
    return model



def model_shape(model: nn.Module) -> ModelShape:

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

    model = meta_model(cfg, compute_dtype, quantize=False)
    model.train()
    head = fused_head(model)
    # sequence parallelism: this rank's tokens of each row (its attention: all of them, 1/N of the heads)
    rows, seq = cfg.train.micro_batch_size, cfg.data.seq_len // cfg.parallel.sequence_parallel
    ids = torch.zeros(rows, seq, dtype=torch.long, device="meta")
    classification = cfg.model.task != "causal_lm"  # a reward model scores a row as a one-label classifier
    labels = torch.zeros(rows if classification else (rows, seq), dtype=torch.long)
    # The fused head picks its target positions from the labels' values, so they are real.
    labels = labels if head is not None else labels.to("meta")
    with saved_tensor_bytes(model, decoder_layers(model)) as totals:
        task = "sequence_classification" if classification else "causal_lm"
        forward_summed_loss(model, {"input_ids": ids}, labels, task)
    hidden = getattr(model.config, "hidden_size", 0)
    element = torch.empty((), dtype=compute_dtype).element_size()
    outputs = model.config.num_labels if classification else model.config.vocab_size
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
    """(device, host) bytes of one micro-batch's activations. Offloaded (trainer/model/activation_offload.py),
    what forward saves waits in host memory; the device holds what backward works on: one layer's
    saved tensors (recomputed, under checkpointing) and the next ones coming back, counted as one
    more layer's (or its input, under checkpointing), and the loss head's transient."""
    if not offload:
        return activation_bytes(acts, layers, checkpointing), 0
    per_layer = acts.in_layers // max(layers, 1)
    if checkpointing:
        return per_layer + acts.layer_input + acts.logits, layers * acts.layer_input + acts.outside
    return 2 * per_layer + acts.logits, acts.in_layers + acts.outside



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
    compute = torch.empty((), dtype=compute_dtype(cfg.parallel.mixed_precision, cfg.model.dtype, "cuda")).element_size()
    return ElementSizes(master=master, compute=compute,
                        quantized=sum(shape.quantized_numels), packed=packed,
                        constants=sum(nf4_bytes(n) for n in shape.quantized_numels) - packed)
