"""`parallel.mixed_precision: auto`: bf16 where the hardware computes it (CUDA, a CPU with AVX512-BF16
or AMX) or the master weights are bf16, fp32 on other CPUs; an explicit bf16 or fp32 is kept, and the
plan's compute dtype is what was taken."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_LLAMA, make_cfg, planned
from trainer.runtime import precision
from trainer.runtime.precision import compute_precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_only_where_it_is_native_and_explicit_settings_are_kept(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision.native_bf16_matmul("cpu") is native
    cpu = compute_precision("auto", "float32", "cpu")
    assert cpu == (("bf16", "auto: this CPU has native bf16 matmuls") if native else
                   ("fp32", "auto: this CPU has no native bf16 matmuls (AVX512-BF16 or AMX)"))
    assert compute_precision("auto", "float32", "cuda") == ("bf16", "auto: CUDA")
    assert compute_precision("auto", "bfloat16", "cpu") == ("bf16", "auto: bfloat16 master weights")
    assert compute_precision("bf16", "float32", "cpu") == ("bf16", "parallel.mixed_precision")
    assert compute_precision("fp32", "float32", "cuda") == ("fp32", "parallel.mixed_precision")


def test_the_plan_computes_in_what_auto_took(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg = make_cfg(TINY_LLAMA, mixed_precision="auto")
    assert planned(cfg).compute_dtype == torch.float32
    cfg.parallel.mixed_precision = "bf16"
    assert planned(cfg).compute_dtype == torch.bfloat16
