"""Fixtures: a tokenizer trained in-process and tiny model configs. What the tests share besides
fixtures is in helpers.py (this folder is on sys.path: test modules import it as `helpers`)."""

from __future__ import annotations

import os

# Before transformers is first imported (helpers imports it): offline, quiet, one tokenizer thread.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from helpers import TINY_BERT, TINY_LLAMA, TOY_TEXTS  # noqa: E402
from trainer.model.tokenizer import train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_bpe_tokenizer(TOY_TEXTS, vocab_size=TINY_LLAMA["vocab_size"])


@pytest.fixture
def tiny_llama_config() -> dict:
    return dict(TINY_LLAMA)


@pytest.fixture
def tiny_bert_config() -> dict:
    return dict(TINY_BERT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests of tens of seconds (they still run in CI)")
