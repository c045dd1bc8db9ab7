"""Hub ids from the local Hugging Face cache, laid out as huggingface_hub lays it, with no network
(HF_HUB_OFFLINE=1 everywhere): a model named `org/name[@revision]` loads from its cached snapshot,
a cache holding config.json alone serves a plan, and a name the cache lacks is one line naming the
command that downloads it. End to end: a hub id trains, exports and evaluates; a missing one ends
`finetrain train` in one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import (REPO, TINY_LLAMA, causal_config, hub_cache_model, hub_cache_repo, read_metrics, run_cli,
                     trainer_env, write_config)
from trainer.config.schema import Config, ModelConfig, is_hub_id, load_config
from trainer.model.loading import model_config, resolve_model_path
from trainer.model.tokenizer import build_tokenizer
from trainer.plan import plan_run
from trainer.runtime.errors import ConfigError


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub reads in this process (as HF_HUB_CACHE would set it)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer, saved as a Hugging Face folder."""
    from helpers import TOY_TEXTS
    from trainer.model.tokenizer import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA)).save_pretrained(folder)
    train_bpe_tokenizer(TOY_TEXTS, TINY_LLAMA["vocab_size"]).save_pretrained(folder)
    return folder


def hub_config(tmp_path: Path, path: str) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(path=path)
    cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg


def test_a_hub_id_is_no_local_path():
    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("org/name@v1.0") and is_hub_id("org/name@0123abcd")
    assert not any(is_hub_id(p) for p in ("/models/llama", "./org/name", "~/org/name", "name", "a/b/c", "builtin:x"))


def test_a_hub_id_resolves_to_its_cached_snapshot_and_revision(hub_cache, tiny_model_folder, tmp_path):
    main = hub_cache_model(hub_cache, "acme/tiny-llama", tiny_model_folder)
    older = hub_cache_repo(hub_cache, "acme/tiny-llama", {"config.json": json.dumps({**TINY_LLAMA, "num_hidden_layers": 1})},
                           revision="v0")
    assert resolve_model_path("acme/tiny-llama", weights=True) == str(main)
    assert resolve_model_path("acme/tiny-llama@v0") == str(older)
    assert model_config(hub_config(tmp_path, "acme/tiny-llama@v0")).num_hidden_layers == 1
    assert model_config(hub_config(tmp_path, "acme/tiny-llama")).num_hidden_layers == 2
    tokenizer = build_tokenizer(hub_config(tmp_path, "acme/tiny-llama"), lambda: [])
    assert len(tokenizer) <= TINY_LLAMA["vocab_size"] and tokenizer.chat_template
    # weights only where they load: the revision holding config.json alone has none
    with pytest.raises(ConfigError) as err:
        resolve_model_path("acme/tiny-llama@v0", weights=True)
    assert str(err.value) == (f"model.path: the Hugging Face cache holds acme/tiny-llama@v0's config.json but not its "
                              f"weights ({older}); download them where there is network access: "
                              "hf download acme/tiny-llama --revision v0")


def test_a_name_missing_from_the_cache_is_one_line_naming_the_download(hub_cache, tmp_path):
    cfg = hub_config(tmp_path, "acme/absent")
    cfg.data.datasets = []
    with pytest.raises(ConfigError) as err:
        plan_run(cfg, 1, "cpu")
    first = str(err.value).splitlines()[0]
    assert first == (f"model.path: acme/absent is not in the Hugging Face cache {hub_cache} (nor a local folder); "
                     "download a model once where there is network access: hf download acme/absent config.json "
                     "(config.json is all that is read here; training needs the whole model: hf download acme/absent) "
                     "(and point HF_HOME or HF_HUB_CACHE at that cache here)")


def test_a_cache_holding_config_json_alone_serves_the_plan(hub_cache, tmp_path):
    hub_cache_repo(hub_cache, "acme/big", {"config.json": json.dumps(TINY_LLAMA)})
    cfg = hub_config(tmp_path, "acme/big")
    cfg.model.dropout = 0.1  # read from the cached config.json
    cfg.data.datasets = []
    with pytest.raises(ConfigError) as err:
        plan_run(cfg, 1, "cpu")
    assert "model.path" not in str(err.value) and "data.datasets" in str(err.value)


def finetrain(*args: str, env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.mark.slow
def test_a_hub_id_trains_exports_and_evaluates_offline_and_a_missing_one_is_one_line(tmp_path, tiny_model_folder):
    """`model.path: acme/tiny-llama` in an HF_HOME of its own, HF_HUB_OFFLINE=1: the run trains and
    evaluates its held-out set, its checkpoint exports (the base read from the cache again), and the
    exported folder holds the trained weights; `acme/absent` ends in one line, exit 2."""
    hf_home = tmp_path / "hf_home"
    hub_cache_model(hf_home / "hub", "acme/tiny-llama", tiny_model_folder)
    env = {**trainer_env(), "HF_HOME": str(hf_home)}
    env.pop("HF_HUB_CACHE", None)
    cfg = causal_config(tmp_path, rows=48, data={"eval": {"fraction": 0.1}}, train={"max_steps": 3})
    cfg["model"] = {"path": "acme/tiny-llama"}
    config = write_config(cfg, tmp_path / "hub.yaml")
    run_cli(config, env_extra={"HF_HOME": str(hf_home)})
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("eval/sft/loss" in r for r in records)

    out = tmp_path / "exported"
    proc = finetrain("export", str(tmp_path / "run"), "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    assert not torch.equal(exported.lm_head.weight, base.lm_head.weight)  # trained, not the cached base

    cfg["model"] = {"path": "acme/absent"}
    cfg["run"]["output_dir"] = str(tmp_path / "run-absent")
    proc = run_cli(write_config(cfg, tmp_path / "absent.yaml"), check=False, env_extra={"HF_HOME": str(hf_home)})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "acme/absent" in line]
    assert len(lines) == 1 and "hf download acme/absent" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run-absent" / "checkpoints").exists()


def test_load_config_accepts_a_hub_id_and_names_what_a_path_may_be(tmp_path):
    path = write_config({"model": {"path": "org/name"}}, tmp_path / "c.yaml")
    assert load_config(path).model.path == "org/name"
    path = write_config({"model": {"path": str(tmp_path / "nowhere")}}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"model.path: {tmp_path / 'nowhere'} is not a folder, a hub id (org/name) or a builtin: model"
