"""Throughput, MFU, memory; sinks: console progress, metrics.jsonl, Weights & Biases.

Only rank 0 writes. `metrics.jsonl` is opened for append, so a resumed run adds
to the records of the run it continues; the W&B run id is kept in the output
folder, so the resumed run logs into the same W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
import uuid
from pathlib import Path

import torch

from trainer.config import Config, to_dict

log = logging.getLogger("finetrain")

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (and CPUs) get no MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "B200": 2250e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def flops_per_token(model_config, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus causal attention scores
    (12 · layers · hidden · seq_len / 2), the estimate of the PaLM paper's appendix."""
    layers = getattr(model_config, "num_hidden_layers", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    return 6 * num_params + 6 * layers * hidden * seq_len


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    # ru_maxrss is KiB on Linux: the process's peak resident memory.
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsLogger:
    def __init__(self, cfg: Config, is_main: bool, total_steps: int, start_step: int, wandb_run_id: str | None):
        self.cfg = cfg
        self.is_main = is_main
        self.jsonl = None
        self.wandb = None
        self.progress = None
        self.wandb_run_id = wandb_run_id or uuid.uuid4().hex[:12]
        if not is_main:
            return
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.logging.jsonl:
            self.jsonl = open(out / "metrics.jsonl", "a")
        if cfg.logging.wandb.mode != "disabled":
            self.wandb = self._start_wandb(out)
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=start_step, desc=cfg.run.name, unit="step",
                                 dynamic_ncols=True, file=sys.stderr)

    def _start_wandb(self, out: Path):
        import wandb

        w = self.cfg.logging.wandb
        return wandb.init(
            project=w.project, entity=w.entity, tags=list(w.tags), name=self.cfg.run.name,
            id=self.wandb_run_id, resume="allow", mode=w.mode, dir=str(out), config=to_dict(self.cfg),
        )

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
        if self.progress is not None:
            if "loss" in record:
                self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                          tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            evals = {k: v for k, v in record.items() if k.startswith("eval/") and k.endswith("/loss")}
            if evals:
                self.progress.write(f"step {record['step']}: " + "  ".join(f"{k}={v:.4f}" for k, v in evals.items()))

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(steps)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


class StepTimer:
    """Wall time of one optimizer step (synchronising CUDA so the time is real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0.0

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
