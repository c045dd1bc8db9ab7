"""QLoRA (model.quantization: nf4) end to end on one process: it trains, its checkpoint holds
the adapter but not the 4-bit base, and both exports load back with the trained logits.
The multi-rank side (fsdp and ddp follow single's curve, resume, sharding) is in test_parallel.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import (NF4_LLAMA, TOY_TEXTS, causal_config, export, latest_checkpoint, logits_of, read_metrics, run_cli,
                     sample_ids, train_in_process, write_config)
from trainer.build import build_model
from trainer.config.schema import Config, load_config
from trainer.model.tokenizer import train_bpe_tokenizer
from trainer.plan import plan_run
from trainer.runtime.errors import ConfigError


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A seeded tiny Llama with its tokenizer, saved as the 'pretrained' folder QLoRA quantizes."""
    folder = tmp_path_factory.mktemp("nf4-base") / "model"
    tokenizer = train_bpe_tokenizer(TOY_TEXTS, vocab_size=NF4_LLAMA["vocab_size"])
    cfg = Config()
    cfg.model.config = dict(NF4_LLAMA)
    build_model(cfg, tokenizer, "sdpa").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def qlora_config(tmp_path: Path, base_folder: Path, method: str = "lora", **sections) -> dict:
    cfg = causal_config(tmp_path, **{"optim": {"lr": 1e-2, "warmup_steps": 2}, "train": {"max_steps": 10}, **sections})
    cfg["model"] = {"path": str(base_folder), "quantization": "nf4"}
    cfg["peft"] = {"method": method, "r": 8, "alpha": 16}
    return cfg


def quantized_base(trainer) -> torch.nn.Module:
    """The run's model as transformers and bitsandbytes load it, without the adapter."""
    base_cfg = dataclasses.replace(trainer.cfg, peft=dataclasses.replace(trainer.cfg.peft, method="none"))
    return build_model(base_cfg, trainer.tokenizer, attention="sdpa").eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_qlora_trains_and_exports(tmp_path, base_folder, method):
    from peft import PeftModel
    from torch.distributed.checkpoint import FileSystemReader

    # (IA)^3 scales activations of a random base: too little to move the loss in a few steps.
    steps = 10 if method == "lora" else 3
    trainer, _ = train_in_process(qlora_config(tmp_path, base_folder, method, train={"max_steps": steps}), tmp_path)
    if method == "lora":
        losses = [r["loss"] for r in read_metrics(trainer.cfg.output_dir) if "loss" in r]
        assert losses[-1] < losses[0] - 0.1, losses
    assert type(trainer.strategy.model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"

    # The checkpoint holds the trained adapter and what else is full precision, not the 4-bit weights.
    checkpoint = latest_checkpoint(trainer)
    saved = set(FileSystemReader(str(checkpoint / "dcp")).read_metadata().state_dict_metadata)
    assert any("base_model.model.model.embed_tokens.weight" in key for key in saved)
    assert any(("lora_A" if method == "lora" else "ia3_l") in key for key in saved)
    assert not any("up_proj.base_layer.weight" in key for key in saved), sorted(saved)

    ids = sample_ids(trainer)
    trained = logits_of(trainer.strategy.model, ids)
    assert not torch.allclose(logits_of(quantized_base(trainer), ids), trained, atol=1e-3)  # the adapter trained

    # --merge: a plain model (4-bit weights dequantized, adapter folded in), no quantization_config.
    merged_dir = export(checkpoint, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    torch.testing.assert_close(logits_of(merged, ids), trained, rtol=0, atol=1e-5)

    # Without --merge: the adapter, which peft loads onto the base quantized as in training.
    adapter_dir = export(checkpoint, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(quantized_base(trainer), adapter_dir).eval()
    torch.testing.assert_close(logits_of(reloaded, ids), trained, rtol=0, atol=1e-5)


def test_eval_forwards_compute_what_training_forwards_compute(tmp_path, base_folder):
    """bitsandbytes repacks a 4-bit weight into an inference layout with bf16 scales on its first
    eval forward without gradients (on CPUs with AVX512-BF16); finetrain keeps the training
    layout, so evaluation measures the model that trains (and FSDP2's shards stay intact)."""
    cfg = load_config(write_config(qlora_config(tmp_path, base_folder), tmp_path / "config.yaml"))
    tokenizer = train_bpe_tokenizer(TOY_TEXTS, vocab_size=NF4_LLAMA["vocab_size"])
    model = build_model(cfg, tokenizer, "sdpa")
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]] * 2)
    model.train()
    training = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.no_grad():
        evaluating = model(input_ids=ids).logits
    model.train()
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), training, rtol=0, atol=0)
    torch.testing.assert_close(evaluating, training, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model, peft, message", [
    ({"config": dict(NF4_LLAMA), "tokenizer": "train-bpe"}, {"method": "lora"},
     "model.quantization: nf4 quantizes pretrained weights as they load; set model.path"),
    (None, {"method": "none"}, "model.quantization: nf4 freezes the base in 4-bit, which cannot be trained; set peft.method"),
])
def test_qlora_without_pretrained_weights_or_adapter_is_refused(tmp_path, base_folder, model, peft, message):
    cfg = qlora_config(tmp_path, base_folder)
    cfg["model"] = {**(model or cfg["model"]), "quantization": "nf4"}
    cfg["peft"] = peft
    with pytest.raises(ConfigError) as err:
        plan_run(load_config(write_config(cfg, tmp_path / "config.yaml")), 1, "cpu")
    assert message in str(err.value)


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_zero_refuses_qlora_before_anything_is_built(tmp_path, base_folder, strategy):
    cfg = load_config(write_config(qlora_config(tmp_path, base_folder, parallel={"strategy": strategy}),
                                   tmp_path / "config.yaml"))
    with pytest.raises(ConfigError, match=f"^model.quantization: parallel.strategy {strategy} saves"):
        plan_run(cfg, 2, "cpu")


@pytest.mark.slow
def test_refusal_is_one_line_with_exit_code_2(tmp_path, base_folder):
    config = write_config(qlora_config(tmp_path, base_folder, parallel={"strategy": "zero2"}), tmp_path / "config.yaml")
    proc = run_cli(config, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"finetrain: {config}:") and "model.quantization: parallel.strategy zero2 saves" in lines[0]
