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
after the exchange each document attends only to itself, through the kernel of the backend the
plan picked, as one FlashAttention varlen call (trainer/model/attention.py's `varlen_inputs`):
flash_attn's varlen kernel, torch's (torch_varlen), the varlen reference (their CPU oracle), or
sdpa called once per document with its causal kernel (sdpa and sdpa_varlen; no seq_len^2 mask on
any rank). The model runs the registered `sequence_parallel` attention, which wraps that backend;
greedy generation (a KV cache, one token at a time) is not sharded and runs the backend itself
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

from trainer.model.attention import (NAME as VARLEN_REFERENCE, SDPA_VARLEN, SEQUENCE_PARALLEL_ATTENTION, TORCH_VARLEN,
                                     VarlenCall, half_inputs, reference_varlen, sdpa_varlen, torch_varlen,
                                     varlen_inputs)
from trainer.runtime.errors import ConfigError

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
    call, restore = varlen_inputs(sequence.backend, module, q, k, v, None, dropout=dropout, scaling=scaling,
                                  sliding_window=sliding_window, softcap=softcap, cu_seq_lens_q=cu_seq_lens_q,
                                  cu_seq_lens_k=cu_seq_lens_q, max_length_q=longest, max_length_k=longest,
                                  check_values=False)
    return heads_to_sequence(restore(WHOLE_SEQUENCE_KERNELS[sequence.backend](call)), sequence), None


def _flash_attn_varlen(call: VarlenCall) -> torch.Tensor:
    """The call through flash_attn's `flash_attn_varlen_func`, as transformers' flash_attention_2
    makes it (fp32 inputs cast to the autocast dtype, bf16 outside autocast, and the output back)."""
    from flash_attn import flash_attn_varlen_func

    dtype = call.q.dtype
    q, k, v = half_inputs(call)
    window = (call.sliding_window - 1, call.sliding_window - 1) if call.sliding_window else (-1, -1)
    cu_q, cu_k = (cu.to(device=q.device, dtype=torch.int32) for cu in (call.cu_q, call.cu_k))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, call.max_q, call.max_k, dropout_p=call.dropout,
                                 softmax_scale=call.scale, causal=call.causal, window_size=window,
                                 softcap=call.softcap or 0.0)
    return out.to(dtype)


# The kernel that runs each backend's whole sequences after the exchange; sdpa's is one causal
# sdpa call per document (sdpa_varlen), where sdpa itself would need a block mask over the rows.
WHOLE_SEQUENCE_KERNELS = {"flash_attention_2": _flash_attn_varlen, TORCH_VARLEN: torch_varlen,
                          SDPA_VARLEN: sdpa_varlen, "sdpa": sdpa_varlen, VARLEN_REFERENCE: reference_varlen}
assert set(WHOLE_SEQUENCE_KERNELS) == set(SEQUENCE_PARALLEL_ATTENTION)


AttentionInterface.register(NAME, sequence_parallel_attention)
# No mask function is registered for NAME: transformers then builds no mask at all (the shard
# carries the documents' bounds instead).
