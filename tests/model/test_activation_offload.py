"""train.activation_offload (trainer/model/activation_offload.py): what forward saves for backward waits
in host memory and comes back unchanged, so loss and gradients are those of a plain step, alone
and under activation checkpointing and compilation. (On a CPU the copies only exercise the path;
the training curves with it are compared in tests/parallel/test_strategies.py.)"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from helpers import TINY_LLAMA
from trainer.build import build_model
from trainer.config.schema import Config, ModelConfig, ParallelConfig, TrainConfig
from trainer.model.activation_offload import ActivationOffload, _Offloaded
from trainer.model.loss import forward_summed_loss


def tiny_model(tokenizer, checkpointing: bool = False, compiled: bool = False):
    from trainer.parallel.layer_options import apply_layer_options

    cfg = Config(model=ModelConfig(config=dict(TINY_LLAMA), tokenizer="train-bpe"),
                 parallel=ParallelConfig(activation_checkpointing=checkpointing), train=TrainConfig(compile=compiled))
    model = build_model(cfg, tokenizer, "sdpa")
    apply_layer_options(model, cfg, torch.device("cpu"))
    return model


def step(model, offload: ActivationOffload | None):
    ids = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    with offload if offload is not None else contextlib.nullcontext():
        loss = forward_summed_loss(model, {"input_ids": ids, "use_cache": False}, ids, "causal_lm")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_activations_change_no_loss_or_gradient(tiny_tokenizer, checkpointing):
    model = tiny_model(tiny_tokenizer, checkpointing)
    plain = step(model, None)
    offload = ActivationOffload()
    assert_same(step(model, offload), plain)
    params = {p.data_ptr() for p in model.parameters()}
    assert offload.saved and not any(item.host.data_ptr() in params for item in offload.saved)
    hidden = TINY_LLAMA["hidden_size"] * 2 * 48 * 4  # one layer input, float32
    if checkpointing:  # each layer keeps only its input, and that input went to the host
        assert sum(item.nbytes == hidden for item in offload.saved) >= TINY_LLAMA["num_hidden_layers"]


def test_parameters_and_small_tensors_stay_where_they_are():
    offload = ActivationOffload(min_bytes=64)
    weight = nn.Parameter(torch.randn(32, 32))
    assert offload.pack(weight) is weight
    small = torch.randn(4)
    assert offload.pack(small) is small
    big = torch.randn(64, 64)
    packed = offload.pack(big)
    assert isinstance(packed, _Offloaded) and packed.host is not big
    assert torch.equal(offload.unpack(packed), big)


@pytest.mark.slow
def test_offloading_composes_with_compiled_layers(tiny_tokenizer):
    from trainer.model.compile import BACKEND, backend_problem

    if backend_problem(BACKEND, "cpu"):
        pytest.skip(f"inductor cannot compile here: {backend_problem(BACKEND, 'cpu')}")
    model = tiny_model(tiny_tokenizer, checkpointing=True, compiled=True)
    plain = step(model, None)
    offload = ActivationOffload()
    got = step(model, offload)
    assert offload.saved
    torch.testing.assert_close(got[0], plain[0], rtol=1e-6, atol=0)
    for name, grad in plain[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
