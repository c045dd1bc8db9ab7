"""A reference varlen attention in plain torch, registered as `varlen_reference`.

It receives exactly what transformers hands the `flash_attention_2` backend (the same
mask function decides the `attention_mask`; the same `cu_seq_lens_*`, `max_length_*`
and `position_ids` kwargs arrive) and computes what `flash_attn_varlen_func` would:
attention within each sequence, never across. CPU tests run the model on it to prove
that the inputs the FlashAttention path gets keep packed documents isolated.

Where FlashAttention would silently attend across documents (packed rows in a batch of
more than one without `cu_seq_lens_*`, or a padding mask that overrides them) this
backend raises instead, so a collator that falls into one of those traps fails tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

NAME = "varlen_reference"
# The backends that keep packed documents apart: those that take packed rows flattened with
# cu_seq_lens (flash_attention_2, and this reference of it), and those given a block-diagonal mask.
VARLEN_ATTENTION = ("flash_attention_2", NAME)
MASKED_ATTENTION = ("sdpa", "eager")
# The backends that sequence parallelism runs on whole sequences, one document at a time
# (trainer/sequence_parallel.py); eager would need a seq_len^2 mask on every rank.
SEQUENCE_PARALLEL_ATTENTION = ("flash_attention_2", NAME, "sdpa")


def varlen_reference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | torch.Tensor | None = None,
    max_length_k: int | torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (batch, heads, q_len, dim), key/value (batch, kv_heads, kv_len, dim) ->
    output (batch, q_len, heads, dim), the layout FlashAttention returns."""
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"model.attention: {NAME} does not implement attention sinks (s_aux)")
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    attend = _Attend(
        causal=module.is_causal if is_causal is None else is_causal,
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        dropout=dropout,
        sliding_window=sliding_window,
        softcap=softcap,
        groups=query.shape[1] // key.shape[1],
    )
    # (batch, len, heads, dim), the layout of flash_attn's inputs.
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    has_varlen = any(x is not None for x in (cu_seq_lens_q, cu_seq_lens_k))

    if attention_mask is not None:  # padding: one sequence per row, pads dropped
        if has_varlen:
            raise ValueError(
                f"{NAME}: a padding attention_mask and cu_seq_lens_* together; flash attention would use the "
                "mask and ignore cu_seq_lens, letting packed documents attend to each other. Packed rows must "
                "come without a padding mask"
            )
        if attention_mask.dim() != 2:
            raise ValueError(f"{NAME}: expected a 2D padding mask, got shape {tuple(attention_mask.shape)}")
        return _padded(attend, q, k, v, attention_mask.bool()), None

    if has_varlen:
        if batch != 1:
            raise ValueError(
                f"{NAME}: cu_seq_lens_* with batch size {batch}; flash attention reads cu_seq_lens over rows "
                "flattened into one, so packed micro-batches must be flattened to batch size 1"
            )
        cu_q, cu_k = _check_cu_seq_lens(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, q_len, kv_len)
        return _varlen(attend, q[0], k[0], v[0], cu_q, cu_k).unsqueeze(0), None

    if position_ids is not None and q_len == kv_len and q_len > 1:
        restarts = torch.diff(position_ids, dim=-1) != 1
        if bool(restarts.any()):
            if batch != 1:
                raise ValueError(
                    f"{NAME}: packed rows (position_ids restart within a row) with batch size {batch} and no "
                    "cu_seq_lens_*; flash attention infers packing from position_ids only for batch size 1 and "
                    "would attend across documents. Flatten the rows and pass cu_seq_lens_q/k and max_length_q/k"
                )
            # What flash attention infers for one packed row: a sequence starts at each minimal position.
            positions = position_ids.reshape(-1)
            starts = (positions == positions.min()).nonzero().view(-1)
            cu = torch.cat([starts, starts.new_tensor([positions.numel()])])
            return _varlen(attend, q[0], k[0], v[0], cu, cu).unsqueeze(0), None

    return torch.stack([attend(q[b], k[b], v[b]) for b in range(batch)]), None


class _Attend:
    """Softmax attention of one sequence; causal alignment is bottom-right, as in flash_attn
    (a query attends keys up to its own position counted from the end)."""

    def __init__(self, causal: bool, scale: float, dropout: float, sliding_window: int | None,
                 softcap: float | None, groups: int):
        self.causal, self.scale, self.dropout = causal, scale, dropout
        self.sliding_window, self.softcap, self.groups = sliding_window, softcap, groups

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (lq, heads, dim), k/v (lk, kv_heads, dim) -> (lq, heads, dim)."""
        lq, lk = q.shape[0], k.shape[0]
        if lq == 0:
            return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
        k = k.repeat_interleave(self.groups, dim=1)
        v = v.repeat_interleave(self.groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * self.scale
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        qi = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        ki = torch.arange(lk, device=q.device)[None, :]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if self.causal:
            allowed &= ki <= qi
        if self.sliding_window is not None and lk > self.sliding_window:
            # flash_attn window_size=(w - 1, w - 1), as transformers passes it.
            allowed &= (qi - ki).abs() < self.sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no allowed key outputs 0
        probs = F.dropout(probs, p=self.dropout, training=self.dropout > 0)
        return torch.einsum("hqk,khd->qhd", probs.to(v.dtype), v)


def _varlen(attend: _Attend, q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor) -> torch.Tensor:
    """flash_attn_varlen_func: tokens (total, heads, dim), sequence i is [cu[i], cu[i+1])."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        out[q0:q1] = attend(q[q0:q1], k[k0:k1], v[k0:k1])
    return out


def _padded(attend: _Attend, q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Per row, attention over the tokens the mask keeps; outputs at padding are zero
    (flash attention's unpad, varlen call, re-pad). The mask covers the keys; queries
    are its last q_len columns, as with a KV cache (prefix tuning)."""
    batch, q_len = q.shape[0], q.shape[1]
    if mask.shape[-1] < k.shape[1]:
        raise ValueError(f"{NAME}: padding mask of length {mask.shape[-1]} for {k.shape[1]} keys")
    mask = mask[:, -k.shape[1]:]
    out = q.new_zeros(batch, q_len, q.shape[2], v.shape[-1])
    for b in range(batch):
        keep_q, keep_k = mask[b, -q_len:], mask[b]
        out[b, keep_q] = attend(q[b, keep_q], k[b, keep_k], v[b, keep_k])
    return out


def _check_cu_seq_lens(cu_q, cu_k, max_q, max_k, q_len: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditions flash_attn_varlen_func assumes but does not check: a violation there
    reads out of bounds or leaves outputs uninitialised rather than failing."""
    if any(x is None for x in (cu_q, cu_k, max_q, max_k)):
        raise ValueError(f"{NAME}: pass all of cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k")
    for name, cu, total, longest in (("q", cu_q, q_len, max_q), ("k", cu_k, kv_len, max_k)):
        cu = cu.reshape(-1)
        lengths = torch.diff(cu)
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
            raise ValueError(
                f"{NAME}: cu_seq_lens_{name} must rise from 0 to the {total} flattened tokens, got {cu.tolist()}"
            )
        if int(longest) < int(lengths.max()):
            raise ValueError(f"{NAME}: max_length_{name}={int(longest)} is shorter than a sequence of {int(lengths.max())}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{NAME}: cu_seq_lens_q and cu_seq_lens_k count different numbers of sequences")
    return cu_q.reshape(-1), cu_k.reshape(-1)


AttentionInterface.register(NAME, varlen_reference_attention)
# The same mask as flash_attention_2: None without padding, else the 2D padding mask.
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
