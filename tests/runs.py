"""Helpers to run finetrain end to end from tests: write data and a config, run the CLI, read metrics."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import REPO, TINY_BERT, TINY_LLAMA, write_jsonl

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue cat dog bird fish tree river stone cloud").split()


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Chat examples of varied lengths with a learnable answer (the words reversed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        rows.append({"messages": [
            {"role": "user", "content": "reverse: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]})
    return rows


def word_tokenizer(folder: Path) -> Path:
    """One token per word of WORDS (ids from 2; 0 pads, 1 ends), so every document has
    exactly the length a test needs."""
    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>").save_pretrained(folder)
    return folder


def classification_rows(n: int, seed: int = 0) -> list[dict]:
    """Separable toy task: label 1 when the text speaks of colours, 0 of animals."""
    rng = random.Random(seed)
    colours, animals = ["red", "green", "blue", "yellow", "purple"], ["cat", "dog", "bird", "fish", "horse"]
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        pool = colours if label else animals
        rows.append({"text": " ".join(rng.choice(pool) for _ in range(rng.randint(3, 8))), "label": label})
    return rows


def causal_config(tmp_path: Path, rows: int = 64, **sections) -> dict:
    data = write_jsonl(tmp_path / "data" / "sft.jsonl", chat_rows(rows))
    cfg = {
        "run": {"name": "test", "output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "train-bpe"},
        "data": {"seq_len": 64, "datasets": [{"name": "sft", "path": str(data), "format": "chat"}],
                 "cache_dir": str(tmp_path / "cache")},
        "parallel": {"mixed_precision": "fp32"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 8, "log_every": 1},
        "logging": {"progress_bar": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def classification_config(tmp_path: Path, rows: int = 256, **sections) -> dict:
    data = write_jsonl(tmp_path / "data" / "cls.jsonl", classification_rows(rows))
    cfg = causal_config(tmp_path, **sections)
    cfg["model"] = {"config": dict(TINY_BERT), "tokenizer": "train-bpe", "task": "sequence_classification", "num_labels": 2}
    cfg["data"].update({"packing": False, "datasets": [{"name": "cls", "path": str(data), "format": "classification"}]})
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def trainer_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(REPO))


def run_cli(config: Path, *args: str, timeout: int = 600, check: bool = True,
            env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`finetrain train CONFIG args...` in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, env={**trainer_env(), **(env_extra or {})},
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetrain exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}
