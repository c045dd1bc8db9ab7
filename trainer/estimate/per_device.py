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
about 0.52 bytes each instead of the master dtype's (trainer/model/quantization.py).

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

import dataclasses
import functools
import math

import torch

from trainer.config.capabilities import ASYNC_SAVE
from trainer.config.schema import Config
from trainer.estimate.shapes import (ModelShape, activation_placement, activation_shape, element_sizes, meta_model,
                                     model_shape)
from trainer.model.quantization import quant_state_bytes
from trainer.parallel.registry import strategy_class, strategy_names, strategy_problems
from trainer.plan import sequence_problems
from trainer.runtime.errors import UserError
from trainer.runtime.memory import format_bytes
from trainer.runtime.precision import compute_dtype

# ------------------------------------------------------------------------------ model


# -------------------------------------------------------------------------- activations


# ----------------------------------------------------------------------------- strategies


def strategy_memory(name: str, shape: ModelShape, acts: int, cfg: Config, world: int) -> dict:
    """Per-device bytes under strategy `name` on `world` devices: its own accounting
    (trainer/parallel/), plus the activations of one micro-batch and, with asynchronous
    checkpoints, the host copy of the rank's saved state that they keep for the whole run."""

    cls = strategy_class(name)
    row = cls.memory(name, shape, element_sizes(shape, cfg), acts, cfg, world)
    saved = row.pop("saved")
    if cfg.checkpoint.async_ and ASYNC_SAVE in cls.supports:
        row["host"] += saved
    row["activations"] = acts
    row["total"] = row["params"] + row["grads"] + row["optimizer"] + row["activations"]
    return row


def estimate_memory(cfg: Config, nodes: int, gpus_per_node: int) -> list[dict]:
    """One row per strategy: per-device bytes of params, grads, optimizer state and
    activations (plus host bytes under offload); `note` says why a strategy cannot run."""

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
    compute = compute_dtype(cfg.parallel.mixed_precision, cfg.model.dtype, "cuda")
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
