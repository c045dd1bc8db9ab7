"""finetrain's varlen attention backends, registered with transformers' `AttentionInterface`.

All receive exactly what transformers hands its `flash_attention_2` backend (the same mask
function decides the `attention_mask`; the same `cu_seq_lens_*`, `max_length_*` and
`position_ids` kwargs arrive), turn it into one FlashAttention varlen call in `varlen_inputs`
(tokens flattened to `(total, heads, dim)`, sequence i spanning `cu_seq_lens[i]:cu_seq_lens[i+1]`),
and differ only in the kernel that computes it:

- `torch_varlen`: `torch.nn.attention.varlen.varlen_attn`, the FlashAttention kernels that ship
  inside torch (2.10+), so packed rows run pad-free on a CUDA GPU without building flash-attn;
  on Hopper, FlashAttention 3 where torch can activate it (`activate_flash_attention_3`).
- `sdpa_varlen`: each sequence through torch's `scaled_dot_product_attention` (causal, no
  mask), on any device; what `auto` takes for packed rows where no FlashAttention kernel runs
  (a CPU): no position outside a document is computed, where a block mask over whole rows
  computes them all and discards them. On a CPU it computes in fp32 even under bf16 autocast:
  torch's CPU flash-attention backward is 2-8x slower in bf16 than in fp32 (measured at
  SmolLM2's head shapes, documents of 30 to 700 tokens).
- `varlen_reference`: the same computation in plain torch, one sequence at a time, on any
  device. CPU tests run models on it to prove that what the FlashAttention path receives
  keeps packed documents isolated; it is the oracle of `torch_varlen` (same inputs).

Where FlashAttention would silently attend across documents (packed rows in a batch of more
than one without `cu_seq_lens_*`, or a padding mask that overrides them) they raise instead,
so a collator that falls into one of those traps fails tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

log = logging.getLogger("finetrain")

NAME = "varlen_reference"
TORCH_VARLEN = "torch_varlen"
SDPA_VARLEN = "sdpa_varlen"
# The backends that keep packed documents apart: those that take packed rows flattened with
# cu_seq_lens (flash_attention_2, torch's varlen kernels, sdpa per sequence, and their reference),
# and those given a block-diagonal mask.
VARLEN_ATTENTION = ("flash_attention_2", TORCH_VARLEN, SDPA_VARLEN, NAME)
MASKED_ATTENTION = ("sdpa", "eager")
# The backends that sequence parallelism runs on whole sequences, one document at a time
# (trainer/model/sequence_parallel.py): every varlen backend, and sdpa as sdpa_varlen; eager would need
# a seq_len^2 mask on every rank.
SEQUENCE_PARALLEL_ATTENTION = (*VARLEN_ATTENTION, "sdpa")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class VarlenCall:
    """One FlashAttention varlen call: what `flash_attn_varlen_func` and torch's `varlen_attn` take."""

    q: torch.Tensor  # (total_q, heads, dim)
    k: torch.Tensor  # (total_k, kv_heads, dim)
    v: torch.Tensor  # (total_k, kv_heads, dim)
    cu_q: torch.Tensor  # int32 (sequences + 1,)
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool  # bottom-right aligned, as in flash_attn >= 2.1
    scale: float
    sliding_window: int | None = None
    softcap: float | None = None
    dropout: float = 0.0


def varlen_inputs(backend: str, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                  position_ids: torch.Tensor | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                  cu_seq_lens_k: torch.Tensor | None = None, max_length_q: int | torch.Tensor | None = None,
                  max_length_k: int | torch.Tensor | None = None, check_values: bool = True,
                  **kwargs) -> tuple[VarlenCall, Callable[[torch.Tensor], torch.Tensor]]:
    """transformers' attention call -> (the varlen call, a function from its output to the
    (batch, q_len, heads, dim) layout FlashAttention returns). query (batch, heads, q_len, dim),
    key/value (batch, kv_heads, kv_len, dim). Four cases, in the order flash attention takes them:
    a 2D padding mask (pads dropped, one sequence per row), `cu_seq_lens_*` (packed rows flattened
    to one), restarting `position_ids` in one row (packing inferred, as FA2 does), else each row
    one sequence. `check_values` reads cu_seq_lens back to check them (a device sync: the CUDA
    kernel skips it; the collator built them)."""
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"model.attention: {backend} does not implement attention sinks (s_aux)")
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    # (batch, len, heads, dim), the layout of flash_attn's inputs.
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    common = dict(causal=module.is_causal if is_causal is None else is_causal,
                  scale=scaling if scaling is not None else dim ** -0.5,
                  sliding_window=sliding_window, softcap=softcap, dropout=dropout)
    has_varlen = any(x is not None for x in (cu_seq_lens_q, cu_seq_lens_k))

    if attention_mask is not None:  # padding: one sequence per row, pads dropped
        if has_varlen:
            raise ValueError(
                f"{backend}: a padding attention_mask and cu_seq_lens_* together; flash attention would use the "
                "mask and ignore cu_seq_lens, letting packed documents attend to each other. Packed rows must "
                "come without a padding mask"
            )
        if attention_mask.dim() != 2:
            raise ValueError(f"{backend}: expected a 2D padding mask, got shape {tuple(attention_mask.shape)}")
        if attention_mask.shape[-1] < kv_len:
            raise ValueError(f"{backend}: padding mask of length {attention_mask.shape[-1]} for {kv_len} keys")
        # The mask covers the keys; queries are its last q_len columns (as with a KV cache).
        keep_k = attention_mask[:, -kv_len:].bool()
        keep_q = keep_k[:, -q_len:]
        rows_q, rows_k = keep_q.reshape(-1).nonzero().view(-1), keep_k.reshape(-1).nonzero().view(-1)
        lengths_q, lengths_k = keep_q.sum(1, dtype=torch.int32), keep_k.sum(1, dtype=torch.int32)
        call = VarlenCall(q.reshape(-1, heads, dim).index_select(0, rows_q),
                          k.reshape(batch * kv_len, *k.shape[2:]).index_select(0, rows_k),
                          v.reshape(batch * kv_len, *v.shape[2:]).index_select(0, rows_k),
                          _cumulative(lengths_q), _cumulative(lengths_k), int(lengths_q.max()), int(lengths_k.max()),
                          **common)

        def restore(out: torch.Tensor) -> torch.Tensor:  # outputs at padding are zero
            full = out.new_zeros(batch * q_len, *out.shape[1:])
            return full.index_copy(0, rows_q, out).reshape(batch, q_len, *out.shape[1:])

        return call, restore

    if has_varlen:
        if batch != 1:
            raise ValueError(
                f"{backend}: cu_seq_lens_* with batch size {batch}; flash attention reads cu_seq_lens over rows "
                "flattened into one, so packed micro-batches must be flattened to batch size 1"
            )
        if any(x is None for x in (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)):
            raise ValueError(f"{backend}: pass all of cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k")
        cu_q, cu_k = cu_seq_lens_q.reshape(-1), cu_seq_lens_k.reshape(-1)
        if check_values:
            _check_cu_seq_lens(backend, cu_q, cu_k, max_length_q, max_length_k, q_len, kv_len)
        call = VarlenCall(q[0], k[0], v[0], cu_q, cu_k, int(max_length_q), int(max_length_k), **common)
        return call, lambda out: out.unsqueeze(0)

    if position_ids is not None and q_len == kv_len and q_len > 1:
        restarts = torch.diff(position_ids, dim=-1) != 1
        if bool(restarts.any()):
            if batch != 1:
                raise ValueError(
                    f"{backend}: packed rows (position_ids restart within a row) with batch size {batch} and no "
                    "cu_seq_lens_*; flash attention infers packing from position_ids only for batch size 1 and "
                    "would attend across documents. Flatten the rows and pass cu_seq_lens_q/k and max_length_q/k"
                )
            # What flash attention infers for one packed row: a sequence starts at each minimal position.
            positions = position_ids.reshape(-1)
            starts = (positions == positions.min()).nonzero().view(-1)
            cu = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
            longest = int(cu.diff().max())
            return VarlenCall(q[0], k[0], v[0], cu, cu, longest, longest, **common), lambda out: out.unsqueeze(0)

    # every row one sequence
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=query.device) * q_len
    cu_k = torch.arange(batch + 1, dtype=torch.int32, device=query.device) * kv_len
    call = VarlenCall(q.reshape(batch * q_len, heads, dim), k.reshape(batch * kv_len, *k.shape[2:]),
                      v.reshape(batch * kv_len, *v.shape[2:]), cu_q, cu_k, q_len, kv_len, **common)
    return call, lambda out: out.reshape(batch, q_len, *out.shape[1:])


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _check_cu_seq_lens(backend: str, cu_q, cu_k, max_q, max_k, q_len: int, kv_len: int) -> None:
    """The conditions flash_attn_varlen_func assumes but does not check: a violation there
    reads out of bounds or leaves outputs uninitialised rather than failing."""
    for name, cu, total, longest in (("q", cu_q, q_len, max_q), ("k", cu_k, kv_len, max_k)):
        lengths = torch.diff(cu)
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
            raise ValueError(
                f"{backend}: cu_seq_lens_{name} must rise from 0 to the {total} flattened tokens, got {cu.tolist()}"
            )
        if int(longest) < int(lengths.max()):
            raise ValueError(f"{backend}: max_length_{name}={int(longest)} is shorter than a sequence of "
                             f"{int(lengths.max())}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{backend}: cu_seq_lens_q and cu_seq_lens_k count different numbers of sequences")


# ----------------------------------------------------------------------------- the reference kernel


def reference_varlen(call: VarlenCall) -> torch.Tensor:
    """flash_attn_varlen_func in plain torch: attention within each sequence, never across."""
    attend = _Attend(call.causal, call.scale, call.dropout, call.sliding_window, call.softcap,
                     groups=call.q.shape[1] // call.k.shape[1])
    out = torch.empty(call.q.shape[0], call.q.shape[1], call.v.shape[-1], dtype=call.q.dtype, device=call.q.device)
    bounds_q, bounds_k = call.cu_q.tolist(), call.cu_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        out[q0:q1] = attend(call.q[q0:q1], call.k[k0:k1], call.v[k0:k1])
    return out


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


@torch.compiler.disable  # a loop over sequences read from cu_seq_lens: compiled layers call it eagerly
def varlen_reference_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (batch, heads, q_len, dim), key/value (batch, kv_heads, kv_len, dim) ->
    output (batch, q_len, heads, dim), the layout FlashAttention returns."""
    call, restore = varlen_inputs(NAME, module, query, key, value, attention_mask, **kwargs)
    return restore(reference_varlen(call)), None


# ----------------------------------------------------------------------------- sdpa, one sequence at a time


def sdpa_varlen(call: VarlenCall) -> torch.Tensor:
    """The varlen call as one `scaled_dot_product_attention` per sequence: split (views; its
    backward is one concatenation), causal without a mask where queries and keys are the same
    positions, a bottom-right aligned mask otherwise (a KV cache), a band for sliding windows."""
    if call.softcap is not None:
        raise ValueError(f"{SDPA_VARLEN}: scaled_dot_product_attention does not soft-cap attention scores; use "
                         "eager, sdpa or flash_attention_2 for this model")
    dtype, device_type = call.q.dtype, call.q.device.type
    compute = torch.float32 if device_type == "cpu" else dtype
    q, k, v = (x.to(compute) for x in (call.q, call.k, call.v))
    lengths_q, lengths_k = call.cu_q.diff().tolist(), call.cu_k.diff().tolist()
    gqa = q.shape[1] != k.shape[1]
    outputs = []
    # autocast would cast the inputs of every sdpa call back to bf16
    no_autocast = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
        else contextlib.nullcontext()
    with no_autocast:
        for q_i, k_i, v_i in zip(q.split(lengths_q), k.split(lengths_k), v.split(lengths_k)):
            outputs.append(_sdpa_sequence(call, q_i, k_i, v_i, gqa))
    return torch.cat(outputs).to(dtype)


def _sdpa_sequence(call: VarlenCall, q_i: torch.Tensor, k_i: torch.Tensor, v_i: torch.Tensor, gqa: bool) -> torch.Tensor:
    """One sequence: q (lq, heads, dim), k/v (lk, kv_heads, dim) -> (lq, heads, dim)."""
    lq, lk = q_i.shape[0], k_i.shape[0]
    if lq == 0:
        return q_i
    mask, causal = None, call.causal
    if call.sliding_window is not None or (call.causal and lq != lk):
        qi = torch.arange(lq, device=q_i.device)[:, None] + (lk - lq)
        ki = torch.arange(lk, device=q_i.device)[None, :]
        mask = ki <= qi if call.causal else torch.ones(lq, lk, dtype=torch.bool, device=q_i.device)
        if call.sliding_window is not None:
            mask = mask & ((qi - ki).abs() < call.sliding_window)
        causal = False
    out = F.scaled_dot_product_attention(q_i.transpose(0, 1)[None], k_i.transpose(0, 1)[None],
                                         v_i.transpose(0, 1)[None], attn_mask=mask, dropout_p=call.dropout,
                                         is_causal=causal, scale=call.scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


@torch.compiler.disable  # sequence lengths read from cu_seq_lens: compiled layers call it eagerly
def sdpa_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """The `sdpa_varlen` backend: what `varlen_reference_attention` computes (same inputs), with
    torch's sdpa kernels, one sequence at a time."""
    call, restore = varlen_inputs(SDPA_VARLEN, module, query, key, value, attention_mask, **kwargs)
    return restore(sdpa_varlen(call)), None


# ----------------------------------------------------------------------------- torch's FlashAttention kernels


def torch_varlen_problem(device_type: str) -> str | None:
    """Why `torch_varlen` cannot run in this process, or None: it needs torch's varlen API
    (torch 2.10+) and a CUDA GPU that FlashAttention-2 supports (compute capability 8.0+)."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch 2.10 or newer has it)"
    if device_type != "cuda":
        return f"torch's FlashAttention kernels run on a CUDA GPU, and this process runs on {device_type}"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        major, minor = torch.cuda.get_device_capability()
        return f"torch's FlashAttention kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


def torch_varlen(call: VarlenCall) -> torch.Tensor:
    """The call through `torch.nn.attention.varlen.varlen_attn`. Its signature changed after
    torch 2.10 (`is_causal` became `window_size`; `scale` and `enable_gqa` arrived), so the
    arguments follow the installed signature. The kernels take 16-bit inputs only: anything else
    is cast to the autocast dtype (bf16 outside autocast) and the output cast back."""
    from torch.nn.attention.varlen import varlen_attn

    if call.dropout:
        raise ValueError(f"{TORCH_VARLEN}: torch's varlen kernels have no attention dropout (model.dropout); "
                         "use model.attention=sdpa or flash_attention_2")
    if call.softcap is not None:
        raise ValueError(f"{TORCH_VARLEN}: torch's varlen kernels do not soft-cap attention scores; use sdpa or "
                         "flash_attention_2 for this model")
    dtype = call.q.dtype
    q, k, v = half_inputs(call)
    params = _varlen_parameters()
    kwargs = {}
    if "window_size" in params:
        left = -1 if call.sliding_window is None else call.sliding_window - 1
        kwargs["window_size"] = (left, 0) if call.causal else (left, left)
    else:
        if call.sliding_window is not None:
            raise ValueError(f"{TORCH_VARLEN}: torch {torch.__version__}'s varlen_attn has no sliding window")
        kwargs["is_causal"] = call.causal
    if "scale" in params:
        kwargs["scale"] = call.scale
    elif call.scale != q.shape[-1] ** -0.5:
        q = q * (call.scale * q.shape[-1] ** 0.5)  # the kernel scales by 1/sqrt(dim)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = varlen_attn(q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k, **kwargs)
    return out.to(dtype)


def half_inputs(call: VarlenCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in 16 bits, as FlashAttention kernels take them (they have no fp32): unchanged when
    16-bit already, else cast to the autocast dtype (bf16 outside autocast)."""
    if call.q.dtype in HALF_DTYPES:
        return call.q, call.k, call.v
    device_type = call.q.device.type
    target = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.bfloat16
    return call.q.to(target), call.k.to(target), call.v.to(target)


def _varlen_parameters() -> set[str]:
    from torch.nn.attention.varlen import varlen_attn

    return set(inspect.signature(varlen_attn).parameters)


def torch_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """The `torch_varlen` backend: what `varlen_reference_attention` computes, through torch's
    FlashAttention kernels (cu_seq_lens are not read back: no device sync per layer)."""
    call, restore = varlen_inputs(TORCH_VARLEN, module, query, key, value, attention_mask, check_values=False,
                                  **kwargs)
    return restore(torch_varlen(call)), None


def activate_flash_attention_3(device: torch.device) -> bool:
    """On a Hopper GPU (compute capability 9.x), route torch's FlashAttention calls to FA3 where
    torch offers it (torch.nn.attention's FA3 implementation, backed by the `flash_attn_interface`
    module of flash-attn's hopper build); True when FA3 is active. One log line either way."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        from torch.nn.attention import activate_flash_attention_impl, list_flash_attention_impls
    except ImportError:
        log.info("model.attention %s: torch %s cannot switch to FlashAttention 3; FlashAttention 2 kernels",
                 TORCH_VARLEN, torch.__version__)
        return False
    if "FA3" not in list_flash_attention_impls() or importlib.util.find_spec("flash_attn_interface") is None:
        log.info("model.attention %s: FlashAttention 2 kernels (FlashAttention 3 on this Hopper GPU needs the "
                 "flash_attn_interface module of flash-attn's hopper build)", TORCH_VARLEN)
        return False
    try:
        activate_flash_attention_impl("FA3")
    except (RuntimeError, ImportError, ValueError) as err:
        log.warning("model.attention %s: FlashAttention 3 could not be activated (%s); FlashAttention 2 kernels",
                    TORCH_VARLEN, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return False
    log.info("model.attention %s: FlashAttention 3 kernels (Hopper)", TORCH_VARLEN)
    return True


for _name, _function in ((NAME, varlen_reference_attention), (TORCH_VARLEN, torch_varlen_attention),
                         (SDPA_VARLEN, sdpa_varlen_attention)):
    AttentionInterface.register(_name, _function)
    # The same mask as flash_attention_2: None without padding, else the 2D padding mask.
    ALL_MASK_ATTENTION_FUNCTIONS.register(_name, flash_attention_mask)
