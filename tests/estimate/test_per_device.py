"""`finetrain estimate`: per-device memory from a model built on the meta device, held to
ZeRO's published accounting and to what real CPU runs use (the per-rank tensors of live
strategies are compared in test_parallel.py)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from helpers import PROBE_MODEL, REPO, TINY_LLAMA, by_strategy, causal_config, make_cfg, write_config
from trainer.estimate.per_device import estimate_memory, format_table

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}


def model_state(row: dict) -> int:
    """Resident parameter, gradient and optimizer bytes (no transient all-gathers)."""
    return row["params"] - row["gathered"] + row["grads"] + row["optimizer"]


def test_8b_model_is_estimated_on_the_meta_device_with_zero_accounting():
    """Llama-3-8B on 8 devices, bf16 compute: built without memory in seconds; per-device
    model state matches the ZeRO paper's 2+2+12 bytes per parameter split (1%: buckets)."""
    cfg = make_cfg(LLAMA3_8B, mixed_precision="bf16")
    cfg.data.seq_len, cfg.train.micro_batch_size = 4096, 1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = by_strategy(estimate_memory(cfg, nodes=2, gpus_per_node=4))
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 2**30
    P, N = 8_030_261_248, 8
    assert rows["zero3"]["parameters"] == P and rows["zero3"]["trainable"] == P
    assert model_state(rows["ddp"]) == pytest.approx(16 * P, rel=0.01)  # fp32 weights, grads, 2 moments
    assert model_state(rows["zero1"]) == pytest.approx(4 * P + 12 * P / N, rel=0.01)
    assert model_state(rows["zero2"]) == pytest.approx(2 * P + 14 * P / N, rel=0.01)
    assert model_state(rows["zero3"]) == pytest.approx(16 * P / N, rel=0.01)
    assert model_state(rows["fsdp"]) == pytest.approx(16 * P / N, rel=0.1)  # + one layer's unsharded grads
    assert rows["single"]["note"].startswith("parallel.strategy: single runs on one process")
    table = format_table(list(rows.values()))
    assert "8,030,261,248 parameters" in table and "| zero3 |" in table and "GiB" in table


def test_peft_counts_gradients_and_optimizer_state_of_the_adapter_only(tiny_tokenizer):
    from trainer.build import build_model
    from trainer.model.structure import parameter_counts

    cfg = make_cfg(TINY_LLAMA, mixed_precision="fp32")
    cfg.peft.method, cfg.peft.r = "lora", 4
    trainable, total = parameter_counts(build_model(cfg, tiny_tokenizer, "sdpa"))
    ddp = by_strategy(estimate_memory(cfg, 1, 2))["ddp"]
    assert (ddp["trainable"], ddp["parameters"]) == (trainable, total)
    assert (ddp["params"], ddp["grads"], ddp["optimizer"]) == (4 * total, 4 * trainable, 8 * trainable)


def test_offload_moves_sharded_state_to_the_host():
    base = by_strategy(estimate_memory(make_cfg(TINY_LLAMA, mixed_precision="bf16"), 1, 2))
    optimizer = by_strategy(estimate_memory(make_cfg(TINY_LLAMA, mixed_precision="bf16", offload="optimizer"), 1, 2))
    params = by_strategy(estimate_memory(make_cfg(TINY_LLAMA, mixed_precision="bf16", offload="params"), 1, 2))
    assert base["zero2"]["host"] == 0 and optimizer["zero2"]["optimizer"] == 0
    assert optimizer["zero2"]["host"] > base["zero2"]["optimizer"]  # + the fp32 gradient partition
    assert params["zero3"]["params"] < optimizer["zero3"]["params"] == base["zero3"]["params"]
    assert params["fsdp"]["params"] == params["fsdp"]["gathered"] and params["fsdp"]["optimizer"] == 0
    assert params["fsdp"]["host"] > 0
    for name in ("ddp", "zero1", "zero2"):
        assert params[name]["note"], name  # parameters can only be offloaded when sharded


def test_async_checkpoints_add_the_saved_state_to_host_memory(tiny_tokenizer):
    """checkpoint.async keeps a host copy of what a rank saves for the whole run: the
    estimate adds exactly the bytes of the state a real model and optimizer checkpoint."""
    from trainer.build import build_model
    from trainer.optim import build_optimizer
    from trainer.parallel.dcp import checkpointed_state

    cfg = make_cfg(TINY_LLAMA, mixed_precision="fp32")
    model = build_model(cfg, tiny_tokenizer, "sdpa")
    optimizer = build_optimizer(model, cfg.optim)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()  # the moments exist from the first step on
    saved = sum(t.nbytes for part in checkpointed_state(model, optimizer) for t in _tensors(part))
    plain = by_strategy(estimate_memory(cfg, 1, 1))
    cfg.checkpoint.async_ = True
    background = by_strategy(estimate_memory(cfg, 1, 1))
    assert background["single"]["host"] - plain["single"]["host"] == pytest.approx(saved, rel=0.01)
    sharded = by_strategy(estimate_memory(cfg, 1, 2))
    assert sharded["fsdp"]["host"] == pytest.approx(saved / 2, rel=0.05)  # each rank stages its shard
    assert sharded["zero3"]["host"] == 0  # zero1-3 refuse checkpoint.async


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def test_mixed_precision_master_dtype_and_checkpointing_change_what_they_should():
    fp32 = by_strategy(estimate_memory(make_cfg(TINY_LLAMA, mixed_precision="fp32"), 1, 1))["single"]
    bf16 = by_strategy(estimate_memory(make_cfg(TINY_LLAMA, mixed_precision="bf16"), 1, 1))["single"]
    ckpt = by_strategy(estimate_memory(make_cfg(TINY_LLAMA, mixed_precision="fp32", activation_checkpointing=True), 1, 1))["single"]
    master_bf16 = make_cfg(TINY_LLAMA, mixed_precision="bf16")
    master_bf16.model.dtype = "bfloat16"
    half = by_strategy(estimate_memory(master_bf16, 1, 1))["single"]
    # layers halve; the loss head keeps its softmax in fp32 (and, fused, adds a bf16 copy of a chunk)
    assert 0.45 < bf16["activations"] / fp32["activations"] < 0.8
    assert bf16["params"] == fp32["params"] and half["params"] == fp32["params"] // 2
    assert ckpt["activations"] < fp32["activations"]


def probe(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "estimate_probe.py"), json.dumps(spec)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate_in_fresh_process(checkpointing: bool, fused_loss: bool = True) -> dict:
    """The estimate next to the measurement, each in a process of its own (as a user runs
    `finetrain estimate` before `finetrain train`)."""
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); import helpers as t; "
        "from trainer.estimate.per_device import estimate_memory; "
        "cfg = t.make_cfg(t.PROBE_MODEL, mixed_precision='fp32'); "
        f"cfg.data.seq_len, cfg.train.micro_batch_size = 256, 4; cfg.parallel.activation_checkpointing = {checkpointing}; "
        f"cfg.train.fused_loss = {fused_loss}; "
        "print(json.dumps(t.by_strategy(estimate_memory(cfg, 1, 1))['single']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_estimate_matches_the_measured_peak_of_a_real_step():
    """One real step of a 7M-parameter Llama (micro 4 x 256 tokens, float32) on CPU, in a
    fresh process each: the peak resident growth (model, grads, AdamW state, activations,
    allocator slack; the code a first step loads lazily is loaded by a tiny step before) is
    the estimated total within a factor of 1.5; the bytes autograd
    actually saves are the estimated activations within 25%: with the fused loss head (the
    default) and with the full logits, whose difference the estimate gets right too; and
    with activation checkpointing, measured with the full logits (with the fused head too
    little is left to checkpoint for the difference to stand out of allocator slack)."""
    spec = {"model": PROBE_MODEL, "micro": 4, "seq_len": 256, "checkpointing": False, "fused_loss": True}
    fused = probe(spec)
    plain = probe({**spec, "fused_loss": False})
    ckpt = probe({**spec, "fused_loss": False, "checkpointing": True})
    estimate_fused = estimate_in_fresh_process(checkpointing=False)
    estimate = estimate_in_fresh_process(checkpointing=False, fused_loss=False)
    estimate_ckpt = estimate_in_fresh_process(checkpointing=True, fused_loss=False)

    def saved(measured: dict) -> int:
        return measured["saved"]["in_layers"] + measured["saved"]["outside"] + measured["logits"]

    # Resident growth also holds allocator slack (measured 0.76x-0.95x of the estimate): a
    # factor of 1.5.
    for measured, estimated in ((fused, estimate_fused), (plain, estimate), (ckpt, estimate_ckpt)):
        assert measured["growth"] == pytest.approx(estimated["total"], rel=0.5)
    assert saved(fused) == pytest.approx(estimate_fused["activations"], rel=0.25)
    assert saved(plain) == pytest.approx(estimate["activations"], rel=0.25)
    # what the fused head and checkpointing save, from the bytes autograd keeps (the
    # difference of two peak resident sizes is dominated by allocator noise)
    assert saved(plain) - saved(fused) == pytest.approx(estimate["activations"] - estimate_fused["activations"], rel=0.25)
    assert saved(plain) - saved(ckpt) == pytest.approx(estimate["activations"] - estimate_ckpt["activations"], rel=0.25)


@pytest.mark.slow
def test_estimate_command_prints_a_table_per_strategy(tmp_path):
    cfg = causal_config(tmp_path)
    path = write_config(cfg, tmp_path / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "estimate", str(path), "--nodes", "2",
                           "--gpus-per-node", "4", "parallel.offload=optimizer"],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("ddp", "fsdp", "zero1", "zero2", "zero3"):
        assert f"| {name} |" in proc.stdout
    assert "on 8 device(s)" in proc.stdout
    assert "- ddp: parallel.offload optimizer" in proc.stdout  # refused, and why


# ------------------------------------------------------------------------------ long context


def test_sequence_parallelism_and_activation_offloading_in_the_estimate():
    """Sequence ranks each hold seq_len/N tokens of a row: N=2 gives the activations of half the
    row; offloading keeps on the device what backward works on and puts the rest in host memory."""
    cfg = make_cfg(PROBE_MODEL, mixed_precision="bf16")
    cfg.data.seq_len, cfg.train.micro_batch_size = 8192, 1
    whole = by_strategy(estimate_memory(cfg, 1, 2))["fsdp"]
    cfg.parallel.sequence_parallel = 2
    sharded = by_strategy(estimate_memory(cfg, 1, 2))["fsdp"]
    cfg.parallel.sequence_parallel, cfg.data.seq_len = 1, 4096
    half = by_strategy(estimate_memory(cfg, 1, 2))["fsdp"]
    assert sharded["activations"] == half["activations"] < 0.6 * whole["activations"]
    assert model_state(sharded) == model_state(whole)  # the model is sharded over every rank either way
    cfg.data.seq_len, cfg.parallel.sequence_parallel, cfg.train.activation_offload = 8192, 2, True
    offloaded = by_strategy(estimate_memory(cfg, 1, 2))["fsdp"]
    assert offloaded["activations"] < sharded["activations"] and offloaded["host"] > offloaded["activations"] / 2
    assert by_strategy(estimate_memory(make_cfg(PROBE_MODEL, sequence_parallel=3), 1, 2))["fsdp"]["note"].startswith(
        "parallel.sequence_parallel: 3 ranks per sequence group do not divide the world of 2 ranks")


def test_the_longest_seq_len_fits_and_the_next_one_does_not():
    from trainer.estimate.per_device import USABLE_FRACTION, longest_seq_len

    cfg = make_cfg(PROBE_MODEL, mixed_precision="bf16", activation_checkpointing=True, sequence_parallel=2)
    cfg.train.micro_batch_size = 1
    device = 2**30
    rows = by_strategy(longest_seq_len(cfg, 1, 2, device))
    fsdp = rows["fsdp"]
    assert fsdp["longest"] % 1024 == 0 and fsdp["tokens_per_rank"] == fsdp["longest"] // 2
    for seq_len, fits in ((fsdp["longest"], True), (fsdp["longest"] + 2 * 1024, False)):
        cfg.data.seq_len = seq_len
        assert (by_strategy(estimate_memory(cfg, 1, 2))["fsdp"]["total"] <= USABLE_FRACTION * device) == fits, seq_len
    assert rows["single"]["longest"] is None and rows["single"]["note"]
    cfg.train.activation_offload = True
    offloaded = by_strategy(longest_seq_len(cfg, 1, 2, device))["fsdp"]
    assert offloaded["longest"] > fsdp["longest"] and offloaded["host"] > 0
    limited = by_strategy(longest_seq_len(cfg, 1, 2, device, host_bytes_per_node=2 * offloaded["host"] / 2))["fsdp"]
    assert limited["longest"] < offloaded["longest"]


@pytest.mark.slow
def test_estimate_longest_command(tmp_path):
    cfg = causal_config(tmp_path)
    path = write_config(cfg, tmp_path / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "estimate", str(path), "--nodes", "1",
                           "--gpus-per-node", "2", "--longest", "--gpu-memory-gib", "1", "parallel.sequence_parallel=2",
                           "parallel.activation_checkpointing=true"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| strategy | longest seq_len | tokens per rank |" in proc.stdout and "| fsdp | " in proc.stdout
    assert "parallel.sequence_parallel 2" in proc.stdout
