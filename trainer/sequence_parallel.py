"""Ulysses sequence parallelism (`parallel.sequence_parallel: N`): each rank of a sequence group
computes 1/N of the tokens of every row the group reads, and trades that sequence shard for a
head shard around attention.

Everything but attention works token by token, so a rank runs the embeddings, norms, MLPs,
the LM head and the loss on its own tokens only (trainer/data/sequence_shard.py cuts the rows,
with labels shifted before the cut). In attention, one all-to-all gives each rank every token
of 1/N of the query heads (and 1/N of the key-value heads), the attention runs on whole
sequences, and a second all-to-all gives each rank back its own tokens with all heads. Both
are `all_to_all_single` on the sequence group (gloo and NCCL alike) inside an autograd
function whose backward is the opposite exchange.

Packed documents stay isolated: the shard carries `cu_seq_lens` of the whole micro-batch, and
after the exchange each document attends only to itself, through the backend the plan picked:
FlashAttention's varlen kernel, the varlen reference (its CPU oracle, trainer/attention.py), or
sdpa called once per document with its causal kernel (no seq_len^2 mask on any rank). The model
runs the registered `sequence_parallel` attention, which wraps that backend; greedy generation
(a KV cache, one token at a time) is not sharded and runs the backend itself
(`whole_sequence_attention`).

DeepSpeed ships the same exchange (`UlyssesSPAttentionHF`), but it drops the attention mask and
leaves packed rows to position ids, which sdpa ignores (its packed documents would attend to
each other), overrides the backend's entry for every model of the process, and needs DeepSpeed's
communication layer under FSDP too; this module is what finetrain runs instead.

Rank layout: sequence groups are consecutive ranks (`rank // N` is the data-parallel rank,
`rank % N` the rank within the group), so with HSDP a group lies within one shard group, a node.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AttentionInterface

from trainer.attention import NAME as VARLEN_REFERENCE, SEQUENCE_PARALLEL_ATTENTION, varlen_reference_attention
from trainer.errors import ConfigError

NAME = "sequence_parallel"


def sequence_coordinates(rank: int, size: int) -> tuple[int, int]:
    """(data-parallel rank, rank within the sequence group) of global `rank`."""
    return divmod(rank, size)


@dataclass(frozen=True)
class SequenceGroup:
    """The sequence-parallel group of this process, and the attention it wraps."""

    group: Any  # torch.distributed ProcessGroup
    size: int
    rank: int
    backend: str  # the attention backend run on whole sequences


# Models whose attention is sharded: id(config) -> (config, group). The attention modules of a
# model share its config, which is how the attention function finds the group (the config is
# kept referenced, so its id is not reused while registered).
_SHARDED: dict[int, tuple[Any, SequenceGroup]] = {}


def _text_config(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.get_text_config()


def new_sequence_group(size: int):
    """This rank's group of `size` consecutive ranks (every rank creates every group: collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, size):
        ranks = list(range(start, start + size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def enable_sequence_parallel(model: nn.Module, size: int) -> SequenceGroup:
    """Shard the model's attention over sequence groups of `size` ranks (collective); from here on
    every forward takes a micro-batch cut by `sequence_shard`."""
    config = _text_config(model)
    backend = config._attn_implementation
    if backend == NAME:  # already enabled (a model set up twice)
        return _SHARDED[id(config)][1]
    if backend not in SEQUENCE_PARALLEL_ATTENTION:
        raise ConfigError(f"parallel.sequence_parallel: attention {backend!r} is not one it can run on whole "
                          f"sequences ({', '.join(SEQUENCE_PARALLEL_ATTENTION)})")
    if backend == "sdpa" and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ConfigError("parallel.sequence_parallel: the model attends within a sliding window, which sdpa called "
                          "once per document does not apply; use model.attention=flash_attention_2")
    sequence = SequenceGroup(new_sequence_group(size), size, dist.get_rank() % size, backend)
    _SHARDED[id(config)] = (config, sequence)
    config._attn_implementation = NAME
    return sequence


@contextlib.contextmanager
def whole_sequence_attention(model: nn.Module):
    """Within it, the model attends with its own backend, unsharded (greedy generation)."""
    config = _text_config(model)
    entry = _SHARDED.get(id(config))
    if entry is None or config._attn_implementation != NAME:
        yield
        return
    config._attn_implementation = entry[1].backend
    try:
        yield
    finally:
        config._attn_implementation = NAME


# ------------------------------------------------------------------------------ the exchange


class _AllToAll(torch.autograd.Function):
    """Chunk i of dim 0 goes to rank i of the group; chunk j of the result came from rank j.
    Its own adjoint: backward sends each gradient chunk back where its value came from."""

    @staticmethod
    def forward(ctx, chunks: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        chunks = chunks.contiguous()
        out = torch.empty_like(chunks)
        dist.all_to_all_single(out, chunks, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def sequence_to_heads(x: torch.Tensor, sequence: SequenceGroup) -> torch.Tensor:
    """(batch, heads, local tokens, dim) -> (batch, heads / N, all tokens, dim)."""
    b, h, n, d = x.shape
    size = sequence.size
    chunks = x.reshape(b, size, h // size, n, d).transpose(0, 1)  # chunk i: the heads rank i attends with
    out = _AllToAll.apply(chunks, sequence.group)  # chunk j: those heads on rank j's tokens
    return out.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * n, d)


def heads_to_sequence(x: torch.Tensor, sequence: SequenceGroup) -> torch.Tensor:
    """(batch, all tokens, heads / N, dim) -> (batch, local tokens, heads, dim)."""
    b, n, h, d = x.shape
    size = sequence.size
    chunks = x.reshape(b, size, n // size, h, d).transpose(0, 1)  # chunk i: rank i's tokens
    out = _AllToAll.apply(chunks, sequence.group)  # chunk j: rank j's heads on this rank's tokens
    return out.permute(1, 2, 0, 3, 4).reshape(b, n // size, size * h, d)


# ----------------------------------------------------------------------------- the attention


class _Bounds:
    """Document boundaries as Python ints, read once per forward (the same `cu_seq_lens` tensor
    reaches every layer, and again in backward's recomputation)."""

    tensor: torch.Tensor | None = None
    values: list[int] = []

    @classmethod
    def of(cls, cu: torch.Tensor) -> list[int]:
        if cls.tensor is not cu:
            cls.tensor, cls.values = cu, cu.tolist()
        return cls.values


@torch.compiler.disable  # collectives and a loop over documents: eager inside compiled layers
def sequence_parallel_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, sliding_window: int | None = None,
                                softcap: float | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                                cu_seq_lens_k: torch.Tensor | None = None, max_length_q: int | None = None,
                                max_length_k: int | None = None, position_ids: torch.Tensor | None = None,
                                **kwargs) -> tuple[torch.Tensor, None]:
    """query (1, heads, local tokens, dim), key/value (1, kv heads, local tokens, dim) ->
    (1, local tokens, heads, dim); `cu_seq_lens_q` bounds the documents of the whole micro-batch."""
    sequence = _SHARDED[id(module.config)][1]
    local = query.shape[2]
    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(f"{NAME}: a forward of a sequence-parallel model takes a micro-batch cut by "
                         "trainer.data.sequence_shard.sequence_shard (one flattened row with cu_seq_lens_q/k, "
                         "no attention mask); generation runs under whole_sequence_attention")
    bounds = _Bounds.of(cu_seq_lens_q)
    if bounds[0] != 0 or bounds[-1] != local * sequence.size:
        raise ValueError(f"{NAME}: cu_seq_lens_q spans {bounds[-1]} tokens, but {sequence.size} ranks hold {local} "
                         "each")
    q, k, v = (sequence_to_heads(x, sequence) for x in (query, key, value))
    longest = max_length_q if max_length_q is not None else max(b - a for a, b in zip(bounds, bounds[1:]))
    options = {"dropout": dropout, "scaling": scaling, "sliding_window": sliding_window, "softcap": softcap}
    if sequence.backend == "sdpa":
        out = _sdpa_per_document(module, q, k, v, bounds, dropout, scaling, softcap)
    elif sequence.backend == VARLEN_REFERENCE:
        out = varlen_reference_attention(module, q, k, v, None, cu_seq_lens_q=cu_seq_lens_q,
                                         cu_seq_lens_k=cu_seq_lens_q, max_length_q=longest, max_length_k=longest,
                                         **options)[0]
    else:
        out = _flash_attention_varlen(module, q, k, v, cu_seq_lens_q, longest, **options)
    return heads_to_sequence(out, sequence), None


def _sdpa_per_document(module, q, k, v, bounds: list[int], dropout: float, scaling: float | None,
                       softcap: float | None) -> torch.Tensor:
    """Causal sdpa on each document alone: the flash kernels take no mask (on CPU as on CUDA),
    so nothing of size tokens^2 exists."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if softcap is not None:
        raise ValueError(f"{NAME}: sdpa has no logit soft-capping; use model.attention=flash_attention_2")
    parts = [sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, dropout=dropout,
                                    scaling=scaling, is_causal=True)[0]
             for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(parts, dim=1)


def _flash_attention_varlen(module, q, k, v, cu: torch.Tensor, longest: int, dropout: float, scaling: float | None,
                            sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    """flash_attn_varlen_func on the flattened documents: (1, heads, tokens, dim) in, (1, tokens,
    heads, dim) out, as transformers' flash_attention_2 receives and returns them."""
    from flash_attn import flash_attn_varlen_func

    q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # (tokens, heads, dim)
    dtype = q.dtype
    if dtype == torch.float32:  # FlashAttention computes in 16 bits (transformers casts the same way)
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = (x.to(half) for x in (q, k, v))
    window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)
    cu = cu.to(device=q.device, dtype=torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu, cu, int(longest), int(longest), dropout_p=dropout, softmax_scale=scaling,
                                 causal=getattr(module, "is_causal", True), window_size=window,
                                 softcap=softcap or 0.0)
    return out.to(dtype).unsqueeze(0)


AttentionInterface.register(NAME, sequence_parallel_attention)
# No mask function is registered for NAME: transformers then builds no mask at all (the shard
# carries the documents' bounds instead).
