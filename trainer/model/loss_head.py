"""The LM head and cross-entropy on target positions only, in chunks (`train.fused_loss`).

The plain path projects every position to the vocabulary and keeps the `[tokens, vocab]`
logits (and their fp32 copy and gradient) alive from forward to backward, although
prompts, document starts and padding are no targets. Here the head runs only on the
positions whose shifted label is a target, K positions at a time, and each chunk's
gradient is computed right away (softmax - one-hot), so no chunk outlives its turn:
forward returns the summed cross-entropy and keeps only the gradients of the hidden
states and of the head weight for backward, which merely scales them by the incoming
gradient. Computing the gradient in forward (as Liger-Kernel's fused linear
cross-entropy does) costs three matmuls per chunk; recomputing the logits in backward
would cost four, and would need the (possibly sharded) weight gathered again.

The head stays the model's own module (`TargetOnlyHead` is an `nn.Linear` with the same
parameters and state-dict keys) and is called by the model's own forward, so FSDP2 units
and ZeRO-3 gather its weight and reduce its gradient exactly as they do for the plain
head, once per micro-batch. `summed_target_loss` hands it the targets for one forward.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config.schema import Config
from trainer.runtime.errors import ConfigError

log = logging.getLogger("finetrain")

# Target positions per chunk: in fp32 on CPU, 256 to 2048 run equally fast (at a 49k vocabulary;
# 128 is 15% slower, 32 60%), and a [256, vocab] fp32 chunk is 50 MiB at 49k, 125 MiB at 128k.
# With 16-bit compute each chunk's weight gradient (a 16-bit matmul) is added to an fp32 sum,
# which at 256 targets costs more than the matmul itself (CPU, 49k x 576 head): there chunks grow
# to up to 4x as many targets, as long as their fp32 logits stay within CHUNK_BYTES_16BIT.
CHUNK_TOKENS = 256
CHUNK_BYTES_16BIT = 256 * 2**20


def chunk_tokens(vocab: int, compute_dtype: torch.dtype) -> int:
    """Target positions per chunk of the fused head."""
    if torch.empty((), dtype=compute_dtype).element_size() >= 4:
        return CHUNK_TOKENS
    fits = CHUNK_BYTES_16BIT // (4 * vocab) // CHUNK_TOKENS * CHUNK_TOKENS
    return max(CHUNK_TOKENS, min(4 * CHUNK_TOKENS, fits))

# Config attributes of models that transform the logits after the head (Gemma's soft-capping,
# Cohere's and Granite's scaling): their loss needs the transformed logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def transient_bytes(head: nn.Linear, targets: int, compute_dtype: torch.dtype) -> int:
    """Peak bytes the fused head allocates in forward beyond what it keeps for backward: one
    chunk's fp32 logits (the gradient is written over them), plus the matmul's output and
    the gradient's 16-bit copy under 16-bit compute; and the fp32 sum of the weight's
    gradient when the weight itself is 16-bit (it is kept in the weight's dtype)."""
    element = torch.empty((), dtype=compute_dtype).element_size()
    chunk = min(targets, chunk_tokens(head.out_features, compute_dtype)) * head.out_features * \
        (4 + (element if element < 4 else 0))
    weight = head.weight
    return chunk + (4 * weight.numel() if weight.requires_grad and weight.element_size() < 4 else 0)


def chunk_loss_and_gradient(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: its summed cross-entropy and d CE / d logits (softmax minus one-hot) in the
    logits' dtype, from fp32 softmax statistics: one log-softmax kernel and the gradient written
    over its output (each pass over a [chunk, vocab] tensor is a trip to memory)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    loss = -log_probs.gather(1, targets[:, None]).sum()
    grad = log_probs.exp_()
    grad.scatter_add_(1, targets[:, None], torch.full_like(targets[:, None], -1.0, dtype=torch.float32))
    return loss, grad.to(logits.dtype)


def add_chunk_gradients(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, start: int, grad_hidden: torch.Tensor | None,
                        grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None) -> None:
    """One chunk's d/d logits `g` (in the compute dtype) into the gradients of the hidden states (its
    rows from `start`), of the weight and of the bias (fp32 sums; None: not wanted)."""
    if grad_hidden is not None:
        grad_hidden[start:start + g.size(0)] = g @ w
    if grad_weight is not None:
        if g.dtype == torch.float32:
            grad_weight.addmm_(g.t(), h)
        else:
            grad_weight += g.t() @ h  # the 16-bit product added in fp32, no fp32 copy of it
    if grad_bias is not None:
        grad_bias += g.float().sum(0)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of `hidden @ weight.T + bias` against `targets`, chunk by chunk; the
    gradients are computed in forward for the inputs listed in `wanted`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, wanted, compute_dtype, chunk):
        want_hidden, want_weight, want_bias = wanted
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # fp32 accumulation over chunks; in place (addmm_) when the compute dtype is fp32 too
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        chunk = chunk or chunk_tokens(weight.shape[0], compute_dtype)
        for start in range(0, hidden.size(0), chunk):
            h = hidden[start:start + chunk].to(compute_dtype)
            t = targets[start:start + chunk]
            logits = F.linear(h, w, b)
            if not (want_hidden or want_weight or want_bias):
                loss -= torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, t[:, None]).sum()
                continue
            chunk_loss, g = chunk_loss_and_gradient(logits, t)
            loss += chunk_loss
            add_chunk_gradients(g, h, w, start, grad_hidden, grad_weight, grad_bias)
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if want_weight else None,
            grad_bias.to(bias.dtype) if want_bias else None,
        )
        ctx.used = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("the fused loss supports one backward per forward (no retain_graph)")
        ctx.used = True
        # Scaled in place: these buffers exist only for this backward.
        grads = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in ctx.saved_tensors]
        return *grads, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed CE of the projection of `hidden` [N, H] against `targets` [N], in fp32, with
    no [N, vocab] tensor alive beyond one chunk. Under autocast the matmuls run in the
    autocast dtype, as the plain head's would."""
    device_type = hidden.device.type
    # (no autocast on the meta device, where `finetrain estimate` runs this)
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    grad = torch.is_grad_enabled()
    wanted = (grad and hidden.requires_grad, grad and weight.requires_grad,
              grad and bias is not None and bias.requires_grad)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, wanted, compute_dtype, chunk)


class _LinearTokenLogProbs(torch.autograd.Function):
    """Per-position log softmax(hidden @ weight.T + bias)[targets], [N] in fp32, chunk by chunk.
    Preference losses weigh each position's log-probability by a factor known only once every
    sequence of the micro-batch is summed, so the gradient cannot be formed in forward as the
    summed cross-entropy's is: forward keeps each position's log-sum-exp, backward recomputes each
    chunk's logits (one matmul more than the cross-entropy head, still no [N, vocab] tensor beyond
    a chunk)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, chunk):
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.size(0), chunk):
            logits = F.linear(hidden[start:start + chunk].to(compute_dtype), w, b).float()
            lse[start:start + chunk] = torch.logsumexp(logits, dim=-1)
            out[start:start + chunk] = logits.gather(1, targets[start:start + chunk, None]).squeeze(1) - \
                lse[start:start + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.compute_dtype, ctx.chunk = compute_dtype, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        compute_dtype, chunk = ctx.compute_dtype, ctx.chunk
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        grad_out = grad_out.float()
        for start in range(0, hidden.size(0), chunk):
            h = hidden[start:start + chunk].to(compute_dtype)
            scale = grad_out[start:start + chunk, None]
            # d log p(t) / d logits = one-hot(t) - softmax, times the incoming gradient
            g = torch.exp_(F.linear(h, w, b).float().sub_(lse[start:start + chunk, None])).mul_(-scale)
            g.scatter_add_(1, targets[start:start + chunk, None], scale)
            add_chunk_gradients(g.to(compute_dtype), h, w, start, grad_hidden, grad_weight, grad_bias)
        return (grad_hidden, grad_weight.to(weight.dtype) if want_weight else None,
                grad_bias.to(bias.dtype) if want_bias else None, None, None, None)


def linear_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[targets] per position, [N] in fp32, differentiable,
    with no [N, vocab] tensor alive beyond one chunk. Under autocast the matmuls run in the
    autocast dtype, as the plain head's would."""
    device_type = hidden.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    chunk = chunk or chunk_tokens(weight.shape[0], compute_dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        return _LinearTokenLogProbs.apply(hidden, weight, bias, targets, compute_dtype, chunk)


# ----------------------------------------------------------------------------- the head


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[targets], [N] in fp32, a chunk of positions at a
    time (no gradient: evaluation). Under autocast the matmul runs in the autocast dtype."""
    device_type = hidden.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
    with torch.no_grad(), torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        for start in range(0, hidden.size(0), chunk):
            logits = F.linear(hidden[start:start + chunk].to(compute_dtype), w, b).float()
            picked = logits.gather(1, targets[start:start + chunk, None]).squeeze(1)
            out[start:start + chunk] = picked - torch.logsumexp(logits, dim=-1)
    return out


@dataclass
class _LogProbRequest:
    rows: torch.Tensor  # [N]: row of each position
    cols: torch.Tensor  # [N]: position within the row (of the input_ids, before any virtual tokens)
    targets: torch.Tensor  # [N]: the token whose log-probability the position gives
    length: int  # the rows' length in input_ids
    result: torch.Tensor | None = None


@dataclass
class _LossRequest:
    is_target: torch.Tensor  # [B, T-1]: position p of row b predicts a target (labels shifted)
    targets: torch.Tensor  # [N]: those targets, in row-major order
    shifted: bool = False  # is_target is [B, T]: the last position predicts too (a sequence shard)
    loss: torch.Tensor | None = None


@dataclass
class _TokenLogProbRequest:
    """As a loss request, for each target's log-probability (with its gradient) instead of their sum."""

    is_target: torch.Tensor
    targets: torch.Tensor
    shifted: bool = False
    loss: torch.Tensor | None = None  # the [N] log-probabilities (named as a loss request's result)


class TargetOnlyHead(nn.Linear):
    """The model's LM head. Called while a loss request is pending (`summed_target_loss`)
    it returns the summed CE over the target positions; otherwise it is the plain linear."""

    request: _LossRequest | None = None
    output_checked = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        request = self.request
        if isinstance(request, _LogProbRequest) and request.result is None:
            rows, length, width = hidden.shape
            positions = request.rows * length + (length - request.length) + request.cols
            selected = hidden.reshape(rows * length, width).index_select(0, positions.to(hidden.device))
            request.result = linear_log_probs(selected, self.weight, self.bias, request.targets.to(hidden.device))
            return request.result
        if request is None or getattr(request, "loss", True) is not None:
            return super().forward(hidden)
        rows, length, width = hidden.shape
        # Prompt tuning puts its virtual tokens before the labelled positions: the labels
        # align with the last ones.
        offset = length - request.is_target.size(1) - (0 if request.shifted else 1)
        row, col = request.is_target.nonzero(as_tuple=True)
        positions = (row * length + offset + col).to(hidden.device)
        selected = hidden.reshape(rows * length, width).index_select(0, positions)
        targets = request.targets.to(hidden.device)
        if isinstance(request, _TokenLogProbRequest):
            request.loss = linear_token_log_probs(selected, self.weight, self.bias, targets)
        else:
            request.loss = linear_cross_entropy(selected, self.weight, self.bias, targets)
        return request.loss


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The LM head, looked up through a DDP / DeepSpeed wrapper and a peft wrapper."""
    model = getattr(model, "module", model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None


def fused_head(model: nn.Module) -> TargetOnlyHead | None:
    head = _output_layer(model)
    return head if isinstance(head, TargetOnlyHead) else None


def _unsupported(model: nn.Module) -> str | None:
    """Why the fused head cannot stand in for this model's head, or None."""
    head = _output_layer(model)
    if head is None:
        return f"{type(model).__name__} has no output embedding layer"
    if type(head) is not nn.Linear:
        return (f"its output layer is a {type(head).__module__}.{type(head).__name__}, not a plain nn.Linear "
                "(peft.target_modules may adapt lm_head)")
    config = getattr(model, "config", None)
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"the model transforms its logits after the head (config.{name})"
    return None


def install_fused_head(model: nn.Module, cfg: Config) -> bool:
    """Make the model's LM head a TargetOnlyHead when `train.fused_loss` is on and the model
    allows it; otherwise say once why the plain path runs. Classification keeps its head."""
    if not cfg.train.fused_loss or cfg.model.task != "causal_lm":
        return False
    reason = _unsupported(model)
    if reason:
        log.info("train.fused_loss: using the plain LM head and full logits, because %s", reason)
        return False
    # Same module, parameters and state-dict keys: only the forward changes.
    _output_layer(model).__class__ = TargetOnlyHead
    return True


def summed_target_loss(model: nn.Module, head: TargetOnlyHead, inputs: dict, is_target: torch.Tensor,
                       targets: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Forward through `model` (or its strategy wrapper), whose LM head is `head`; the
    summed CE of the positions `is_target` against `targets` (the caller normalises)."""
    return _through_head(model, head, inputs, _LossRequest(is_target, targets, shifted))


def head_token_log_probs(model: nn.Module, head: TargetOnlyHead, inputs: dict, is_target: torch.Tensor,
                         targets: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Forward through `model`, whose LM head is `head`; the log-probability [N] (fp32, with its
    gradient) of each position `is_target` for its target, in row-major order."""
    return _through_head(model, head, inputs, _TokenLogProbRequest(is_target, targets, shifted))


def _through_head(model: nn.Module, head: TargetOnlyHead, inputs: dict,
                  request: _LossRequest | _TokenLogProbRequest) -> torch.Tensor:
    """What the head computes for `request` in one forward, as the model passes it on."""
    head.request = request
    try:
        loss = model(**inputs).logits  # what the head returned, as the model passes it on
    finally:
        head.request = None
    name = type(getattr(model, "module", model)).__name__
    if request.loss is None:
        raise ConfigError(f"train.fused_loss: {name} never called its output layer in forward; "
                          "set train.fused_loss=false")
    # Once (a transform after the head is in the model's code); meta tensors (`finetrain
    # estimate`) have no values to compare.
    if not head.output_checked and not loss.is_meta:
        if loss.shape != request.loss.shape or not torch.equal(loss.detach(), request.loss.detach()):
            raise ConfigError(f"train.fused_loss: {name} transforms what its output layer returns; "
                              "set train.fused_loss=false")
        head.output_checked = True
    return loss


def head_log_probs(model: nn.Module, head: TargetOnlyHead, inputs: dict, rows: torch.Tensor, cols: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """Forward through `model`, whose LM head is `head`; the log-probability [N] (fp32) that
    position (rows[i], cols[i]) gives token targets[i]. Positions may repeat (the context's
    last position predicts the first token of every choice)."""
    request = _LogProbRequest(rows, cols, targets, inputs["input_ids"].shape[1])
    head.request = request
    try:
        model(**inputs)
    finally:
        head.request = None
    if request.result is None:
        name = type(getattr(model, "module", model)).__name__
        raise ConfigError(f"train.fused_loss: {name} never called its output layer in forward; "
                          "set train.fused_loss=false")
    return request.result
