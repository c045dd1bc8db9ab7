"""The reference model (trainer/preference/reference_model.py): adapter, precomputed and copy give the
same per-step losses, with DPO at ln 2 on the first step; the reference computes in evaluation mode
(trl #1652: a reference left in training mode); and a run that continues an adapter compares with
that adapter, not with the bare base behind it (LLaMA-Factory #8459)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import TINY_LLAMA, preference_config, step_losses, toy_tokenizer, write_config
from trainer.build import build_model
from trainer.config.schema import Config, ModelConfig, PeftConfig, PreferenceConfig, load_config
from trainer.loop import Trainer
from trainer.preference.losses import unit_losses
from trainer.preference.reference_model import AdapterReference, evaluating
from trainer.preference.scoring import score_sequences

STEPS = 5
LORA = {"method": "lora", "r": 4}


def trainer_of(tmp_path: Path, name: str, **sections) -> Trainer:
    cfg = preference_config(tmp_path / name, rows=48, train={"max_steps": STEPS}, **sections)
    return Trainer(load_config(write_config(cfg, tmp_path / name / "config.yaml")))


def losses_of(tmp_path: Path, name: str, **sections) -> list[float]:
    trainer = trainer_of(tmp_path, name, **sections)
    trainer.fit()
    losses = step_losses(trainer.cfg.output_dir)
    return [losses[step] for step in sorted(losses)]


@pytest.mark.slow
def test_every_reference_mode_gives_the_same_per_step_losses(tmp_path):
    runs = {(peft, mode): losses_of(tmp_path, f"{peft}-{mode}", peft=LORA if peft == "lora" else {"method": "none"},
                                    preference={"reference": mode})
            for peft, modes in (("none", ("precomputed", "copy")), ("lora", ("adapter", "precomputed", "copy")))
            for mode in modes}
    for (peft, mode), losses in runs.items():
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4), (peft, mode)
        want = runs[(peft, "precomputed")]
        assert len(losses) == STEPS and losses == pytest.approx(want, rel=1e-5), (peft, mode)
        assert losses[-1] != pytest.approx(losses[0], rel=1e-3)  # it trained: the equality is not trivial


def test_the_reference_computes_in_evaluation_mode(tmp_path):
    """With dropout, the policy's forward differs from one call to the next; its reference must not."""
    trainer = trainer_of(tmp_path, "dropout", peft=LORA, model={"dropout": 0.3})
    strategy, batch = trainer.strategy, trainer.loader.next_step(1)[0]
    reference = trainer.objective.reference
    assert isinstance(reference, AdapterReference)
    strategy.model.train()
    first, second = reference.log_probs(batch), reference.log_probs(batch)
    assert strategy.model.training  # left as it was
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model = strategy.unwrapped_model()
    with torch.no_grad(), model.disable_adapter():
        with evaluating(model):
            base = score_sequences(model, batch, strategy.dist.device, "causal_lm")[0].policy
        training_mode = score_sequences(model, batch, strategy.dist.device, "causal_lm")[0].policy  # the trap
    torch.testing.assert_close(first, base)
    assert (training_mode - base).abs().max() > 1e-3


def test_a_continued_adapter_is_the_reference_not_the_bare_base(tmp_path):
    """An SFT adapter continued by DPO (peft.adapter_path): the reference is base + that adapter, so the
    first step's DPO loss is ln 2; the bare base as reference would not give it."""
    adapter = tmp_path / "sft-adapter"
    sft = build_model(Config(model=ModelConfig(config=dict(TINY_LLAMA), tokenizer="train-bpe"),
                             peft=PeftConfig(method="lora", r=4)), toy_tokenizer(), "sdpa")
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:  # a trained adapter, far from the identity
                param.normal_(std=0.2, generator=torch.Generator().manual_seed(len(name)))
    sft.save_pretrained(adapter)
    trainer = trainer_of(tmp_path, "continued", peft={"method": "lora", "adapter_path": str(adapter)})
    strategy, batch = trainer.strategy, trainer.loader.next_step(1)[0]
    model, device = strategy.unwrapped_model(), strategy.dist.device
    with torch.no_grad(), evaluating(model):
        start = score_sequences(model, batch, device, "causal_lm")[0]  # the policy at step 0: base + the adapter
        with model.disable_adapter():
            bare = score_sequences(model, batch, device, "causal_lm")[0].policy
    reference = trainer.objective.reference.log_probs(batch)
    torch.testing.assert_close(reference, start.policy)
    assert (reference - bare).abs().max() > 1e-2
    start.reference = bare  # the trap: the first step compares with the bare base
    assert float(unit_losses(PreferenceConfig(), "causal_lm", start).losses.mean()) != \
        pytest.approx(math.log(2), abs=1e-3)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reference." in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    trainer.fit()  # the policy has not moved: its first step is ln 2 whichever rows it draws
    assert step_losses(trainer.cfg.output_dir)[1] == pytest.approx(math.log(2), abs=1e-4)
