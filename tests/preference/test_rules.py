"""What the plan refuses of a preference config (trainer/preference/rules.py and the keys' owners):
each combination that cannot work, in one line naming the key, before anything starts."""

from __future__ import annotations

import json

import pytest

from helpers import TINY_LLAMA
from trainer.config.schema import Config, DatasetConfig, EvalSetConfig
from trainer.plan import plan_run
from trainer.runtime.errors import ConfigError


def config(fmt: str = "preference", **keys) -> Config:
    cfg = Config()
    cfg.model.config, cfg.model.tokenizer = dict(TINY_LLAMA), "train-bpe"
    cfg.data.datasets = [DatasetConfig(name="pairs", path="pairs.jsonl", format=fmt)]
    cfg.train.max_steps = 1
    cfg.parallel.mixed_precision = "fp32"
    for dotted, value in keys.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def problems(cfg: Config, world: int = 1) -> list[str]:
    try:
        plan_run(cfg, world, "cpu")
    except ConfigError as err:
        return str(err).splitlines()
    return []


@pytest.mark.parametrize("keys,fmt,line", [
    ({"preference__beta": 0.5}, "chat", "preference.beta: the run trains no preference data"),
    ({}, "unpaired_preference", "data.datasets.0.format: unpaired_preference rows (one judged answer each) train only "
                                "with preference.loss kto, not dpo"),
    ({"preference__loss": "ipo", "preference__label_smoothing": 0.1}, "preference",
     "preference.label_smoothing: preference.loss ipo does not use it"),
    ({"preference__gamma": 1.0}, "preference", "preference.gamma: preference.loss dpo does not use it"),
    ({"preference__loss": "orpo", "preference__sft_weight": 1.0}, "preference", "preference.sft_weight: orpo adds"),
    ({"preference__loss": "simpo", "preference__reference": "copy"}, "preference",
     "preference.reference: preference.loss simpo uses no reference model"),
    ({"preference__reference": "adapter"}, "preference", "preference.reference: adapter switches the peft adapter off"),
    ({"model__task": "reward_model"}, "preference", "data.packing: a reward model scores each sequence"),
    ({"model__task": "reward_model", "data__packing": False}, "chat",
     "data.datasets.0.format: model.task reward_model trains and evaluates on pairs (format preference), not chat"),
    ({"model__task": "reward_model", "data__packing": False, "preference__beta": 1.0}, "preference",
     "preference.beta: model.task reward_model trains with the Bradley-Terry loss"),
])
def test_what_cannot_work_is_refused_in_one_line(keys, fmt, line):
    found = problems(config(fmt, **keys))
    assert any(p.startswith(line) for p in found), found


def test_sequence_parallelism_is_refused_for_preference_data():
    found = problems(config(parallel__strategy="fsdp", parallel__sequence_parallel=2), world=2)
    assert any(p.startswith("parallel.sequence_parallel: preference losses need each sequence's whole") for p in found)


def test_a_preference_eval_set_needs_preference_training():
    cfg = config("chat")
    cfg.data.eval.sets = [EvalSetConfig(name="pairs", path="pairs.jsonl", format="preference")]
    assert any(p.startswith("data.eval.sets.0.format: preference sets are scored with the run's preference loss")
               for p in problems(cfg))


def test_a_continued_adapter_must_be_of_the_method_trained(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert problems(config(peft__method="lora", peft__adapter_path=str(tmp_path))) == []
    assert any(p.startswith(f"peft.adapter_path: {tmp_path} holds a lora adapter, but peft.method is ia3")
               for p in problems(config(peft__method="ia3", peft__adapter_path=str(tmp_path))))
    assert any(p.startswith("peft.r: the adapter of peft.adapter_path keeps its own settings")
               for p in problems(config(peft__method="lora", peft__r=16, peft__adapter_path=str(tmp_path))))
    assert any(p.startswith("peft.adapter_path: continues the adapter of a peft method that adapts layers")
               for p in problems(config(peft__method="bottleneck", peft__adapter_path=str(tmp_path))))
