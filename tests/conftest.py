"""Shared fixtures: a tokenizer trained in-process, tiny model configs, config building."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

TOY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus three? Two plus three is five.",
    "Packing puts many short documents into one row of tokens.",
    "Each document must only attend to itself, never to its neighbours.",
    "user assistant system hello thanks please answer question",
] * 4

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}

# QLoRA's tiny Llama: bitsandbytes quantizes blocks of 64 elements, so its widths are multiples of 64.
NF4_LLAMA = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128}

TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from trainer.model.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(TOY_TEXTS, vocab_size=TINY_LLAMA["vocab_size"])


@pytest.fixture
def tiny_llama_config() -> dict:
    return dict(TINY_LLAMA)


@pytest.fixture
def tiny_bert_config() -> dict:
    return dict(TINY_BERT)


def planned(cfg, world_size: int = 1):
    """The run plan (trainer/plan.py) of a config built in code for a test that makes its own token
    rows: the data keys only describe them, and the tokenizer is trained in-process."""
    from trainer.config.schema import DatasetConfig
    from trainer.plan import plan_run

    if not cfg.data.datasets:
        cfg.data.datasets = [DatasetConfig(name="rows", path="rows", format="text")]
    if cfg.model.tokenizer is None and cfg.model.path is None:
        cfg.model.tokenizer = "train-bpe"
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        cfg.train.max_steps = 1
    return plan_run(cfg, world_size, "cpu")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests of tens of seconds (they still run in CI)")
