"""Data sets named `hf:org/name[:config][:split]`, read from a hub cache laid out as huggingface_hub
lays it (no network): the split's files as the `datasets` library finds them (file-name patterns,
or the configs of the README's YAML), read in order by finetrain's readers; a bad row reported as
a local file's; a data set, config or split the cache lacks is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from huggingface_hub import constants

from helpers import REPO, TINY_LLAMA, chat_rows, hub_cache_repo, trainer_env, write_config
from trainer.config.schema import Config, DatasetConfig, EvalSetConfig, ModelConfig
from trainer.data.eval_sets import declared_sets
from trainer.data.hub_datasets import hub_data_files, parse_hub_data
from trainer.data.run_data import RunData
from trainer.eval.multiple_choice import read_questions
from trainer.runtime.errors import ConfigError, DataError


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


README = """---
configs:
- config_name: short
  data_files:
  - split: train
    path: short/*.jsonl
- config_name: mcq
  data_files:
  - split: test
    path: mcq/test.jsonl
---
# acme/chat
"""


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def run_cfg(tmp_path, path: str) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(config=dict(TINY_LLAMA), tokenizer="train-bpe")
    cfg.data.seq_len = 128
    cfg.data.datasets = [DatasetConfig(name="sft", path=path, format="chat")]
    cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg


def test_the_split_is_its_files_in_order_by_the_datasets_rules(hub_cache, tmp_path):
    rows = chat_rows(30)
    snapshot = hub_cache_repo(hub_cache, "acme/chat", {
        "data/train-00000-of-00002.jsonl": jsonl(rows[:20]), "data/train-00001-of-00002.jsonl": jsonl(rows[20:]),
        "data/test-00000-of-00001.jsonl": jsonl(rows[:3])}, repo_type="dataset")
    cache = tmp_path / "cache"
    assert hub_data_files("hf:acme/chat", "data.datasets.0", cache) == (
        snapshot / "data/train-00000-of-00002.jsonl", snapshot / "data/train-00001-of-00002.jsonl")
    assert hub_data_files("hf:acme/chat:test", "data.datasets.0", cache) == (snapshot / "data/test-00000-of-00001.jsonl",)
    with pytest.raises(ConfigError) as err:
        hub_data_files("hf:acme/chat:validation", "data.datasets.0", cache)
    assert str(err.value) == "data.datasets.0.path: hf:acme/chat:validation: no split 'validation' in acme/chat; its splits: train, test"


def test_a_hub_data_set_trains_as_its_rows_and_a_bad_row_names_its_place(hub_cache, tiny_tokenizer, tmp_path):
    rows = chat_rows(30)
    hub_cache_repo(hub_cache, "acme/chat", {"README.md": README, "short/a.jsonl": jsonl(rows[:12]),
                                            "short/b.jsonl": jsonl(rows[12:])}, repo_type="dataset")
    data = RunData.load(run_cfg(tmp_path, "hf:acme/chat:short:train"), tiny_tokenizer, report=False)
    assert len(data.train[0].data) == 30
    assert data.train[0].data.where(29) == "hf:acme/chat:short:train: row 30"

    bad = rows[12:] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    hub_cache_repo(hub_cache, "acme/broken", {"README.md": README, "short/a.jsonl": jsonl(rows[:12]),
                                              "short/b.jsonl": jsonl(bad)[:-1] + "}\n"}, repo_type="dataset")
    with pytest.raises(DataError) as err:
        RunData.load(run_cfg(tmp_path, "hf:acme/broken:short:train"), tiny_tokenizer, report=False)
    message = str(err.value)
    assert message.startswith("hf:acme/broken:short:train: row 31: not valid JSON") and "\n" not in message
    assert message.endswith("short/b.jsonl:19) (set data.on_bad_row=skip to skip bad rows)")


def test_an_mmlu_shaped_hub_config_is_a_choice_set_its_question_the_context(hub_cache, tiny_tokenizer, tmp_path,
                                                                           caplog):
    questions = [{"question": f"Q{i}?", "choices": ["yes", "no", "maybe"], "answer": i % 3} for i in range(5)]
    hub_cache_repo(hub_cache, "acme/chat", {"README.md": README, "short/a.jsonl": jsonl(chat_rows(2)),
                                            "mcq/test.jsonl": jsonl(questions)}, repo_type="dataset")
    cfg = run_cfg(tmp_path, "unused")
    cfg.data.eval.sets = [EvalSetConfig(name="mcq", path="hf:acme/chat:mcq:test", format="choice")]
    (eval_set,) = [s for s in declared_sets(cfg) if s.format == "choice"]
    with caplog.at_level("INFO", logger="finetrain"):
        assert [q.answer for q in read_questions(eval_set, cfg, tiny_tokenizer)] == [0, 1, 2, 0, 1]
    said = [r.getMessage() for r in caplog.records if "no \"context\" field" in r.getMessage()]
    assert said == ['hf:acme/chat:mcq:test: no "context" field; the questions\' "question" is their context (MMLU and '
                    'ARC shape; fields: {context: NAME} reads another)']


def test_what_the_cache_lacks_is_one_line(hub_cache, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        hub_data_files("hf:acme/absent", "data.datasets.0", cache)
    assert str(err.value) == (f"data.datasets.0.path: acme/absent is not in the Hugging Face cache {hub_cache} (nor a "
                              "local folder); download a data set once where there is network access: hf download "
                              "acme/absent --repo-type dataset (and point HF_HOME or HF_HUB_CACHE at that cache here)")
    hub_cache_repo(hub_cache, "acme/chat", {"README.md": README, "short/a.jsonl": jsonl(chat_rows(2))},
                   repo_type="dataset")
    with pytest.raises(ConfigError) as err:
        hub_data_files("hf:acme/chat:long:train", "data.datasets.0", cache)
    assert str(err.value).startswith("data.datasets.0.path: hf:acme/chat:long:train: ") and "short" in str(err.value)
    for wrong in ("hf:acme", "hf:acme/chat:a:b:c", "hf:acme/chat::train"):
        with pytest.raises(ConfigError):
            parse_hub_data(wrong, "data.datasets.0")


@pytest.mark.slow
def test_finetrain_prepare_reads_a_hub_data_set_offline(tmp_path):
    """`finetrain prepare` with HF_HOME pointing at the cache and HF_HUB_OFFLINE=1."""
    hf_home = tmp_path / "hf_home"
    hub_cache_repo(hf_home / "hub", "acme/chat", {"train.jsonl": jsonl(chat_rows(40))}, repo_type="dataset")
    cfg = {"model": {"config": dict(TINY_LLAMA), "tokenizer": "train-bpe"},
           "run": {"output_dir": str(tmp_path / "run")},
           "data": {"seq_len": 64, "datasets": [{"name": "sft", "path": "hf:acme/chat", "format": "chat"}],
                    "cache_dir": str(tmp_path / "cache")},
           "train": {"max_steps": 1}}
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "prepare", str(write_config(cfg, tmp_path / "c.yaml")),
                           "--workers", "1"], capture_output=True, text=True, cwd=REPO,
                          env={**trainer_env(), "HF_HOME": str(hf_home)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("sft: 40 examples, ")
