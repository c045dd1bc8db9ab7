"""The compute dtype `parallel.mixed_precision: auto` takes on this machine.

bf16 on a CPU without native bf16 matmuls (neither AVX512-BF16 nor AMX) runs through torch's
reference kernels: 1.3-2 GFLOP/s against 46-70 in fp32 measured on such a host, so a run there
would be tens of times slower than it needs to be. `auto` takes bf16 where the hardware computes
it (CUDA; a CPU with AVX512-BF16 or AMX) or where the master weights are bf16 already
(`model.dtype: bfloat16` cannot compute in fp32), fp32 elsewhere; `bf16` and `fp32` are kept as
they are asked.
"""

from __future__ import annotations

import torch


def native_bf16_matmul(device_type: str) -> bool:
    """Whether `device_type` ("cuda" or "cpu") multiplies bf16 matrices in hardware."""
    if device_type == "cuda":
        return True
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def process_device_type() -> str:
    """The device type this process trains on (what the rank's process group picks)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_precision(setting: str, master_dtype: str, device_type: str | None = None) -> tuple[str, str]:
    """("bf16" or "fp32", why) for `parallel.mixed_precision` `setting` with master weights of
    `master_dtype` ("float32" or "bfloat16") on `device_type` (default: this process's)."""
    if setting != "auto":
        return setting, "parallel.mixed_precision"
    device_type = device_type or process_device_type()
    if master_dtype == "bfloat16":
        return "bf16", "auto: bfloat16 master weights"
    if device_type == "cuda":
        return "bf16", "auto: CUDA"
    if native_bf16_matmul(device_type):
        return "bf16", "auto: this CPU has native bf16 matmuls"
    return "fp32", "auto: this CPU has no native bf16 matmuls (AVX512-BF16 or AMX)"


def compute_dtype(setting: str, master_dtype: str, device_type: str | None = None) -> torch.dtype:
    """The torch dtype of `compute_precision` (fp32 compute of bf16 masters is refused by the plan)."""
    precision, _ = compute_precision(setting, master_dtype, device_type)
    return torch.bfloat16 if precision == "bf16" else getattr(torch, master_dtype)
