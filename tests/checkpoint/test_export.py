"""Export: what was trained is what plain transformers / peft load back, to 1e-5."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from helpers import (REPO, causal_config, classification_config, export, latest_checkpoint, logits_of, sample_ids,
                     train_in_process)
from trainer.build import build_model


@pytest.mark.slow
def test_full_model_export_loads_in_transformers(tmp_path):
    trainer, record = train_in_process(causal_config(tmp_path, train={"max_steps": 4}), tmp_path)
    out = export(latest_checkpoint(trainer), tmp_path / "hf", through_the_command_line=True)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = sample_ids(trainer)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(trainer.strategy.model, ids), rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out)("reverse: alpha")["input_ids"] == trainer.tokenizer("reverse: alpha")["input_ids"]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_adapter_export_and_merge(tmp_path, method):
    from peft import PeftModel

    sizes = {"r": 4, "alpha": 8} if method != "ia3" else {}  # (IA)^3 has no rank: the keys would be refused
    cfg = causal_config(tmp_path, train={"max_steps": 4}, peft={"method": method, **sizes})
    trainer, record = train_in_process(cfg, tmp_path)
    checkpoint = latest_checkpoint(trainer)
    ids = sample_ids(trainer)
    trained = logits_of(trainer.strategy.model, ids)

    adapter_dir = export(checkpoint, tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").is_file()
    base_cfg = dataclasses.replace(trainer.cfg, peft=dataclasses.replace(trainer.cfg.peft, method="none"))
    base = build_model(base_cfg, trainer.tokenizer, attention="sdpa")
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    torch.testing.assert_close(logits_of(reloaded, ids), trained, rtol=0, atol=1e-5)

    merged_dir = export(checkpoint, tmp_path / "merged", merge=True)
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(logits_of(merged, ids), trained, rtol=0, atol=1e-5)
    # the adapter did train, so the equalities above could fail
    untouched = build_model(base_cfg, trainer.tokenizer, attention="sdpa").eval()
    assert not torch.allclose(logits_of(untouched, ids), trained, atol=1e-4)


@pytest.mark.slow
def test_merge_without_adapter_is_refused(tmp_path):
    trainer, record = train_in_process(causal_config(tmp_path, train={"max_steps": 2}), tmp_path)
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "export", str(latest_checkpoint(trainer)),
                           "--out", str(tmp_path / "x"), "--merge"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "no adapter to merge" in proc.stderr


@pytest.mark.slow
def test_classifier_learns_separable_task_and_exports(tmp_path):
    cfg = classification_config(tmp_path, rows=400, optim={"lr": 2e-3, "warmup_steps": 5},
                                train={"micro_batch_size": 8, "global_batch_size": 16, "max_steps": 60, "log_every": 10},
                                data={"eval": {"fraction": 0.1}})
    trainer, record = train_in_process(cfg, tmp_path)
    assert record["eval/cls/accuracy"] >= 0.95, record
    out = export(latest_checkpoint(trainer), tmp_path / "hf")
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.tensor([trainer.tokenizer("red blue green")["input_ids"], trainer.tokenizer("cat dog fish")["input_ids"]])
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(trainer.strategy.model, ids), rtol=0, atol=1e-5)
    assert logits_of(loaded, ids).argmax(-1).tolist() == [1, 0]
