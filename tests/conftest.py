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


# The files that take longest (seconds of a full run with --durations, 2 workers on 2 cores), started
# first: `make test` hands each of its workers a whole file at a time (--dist loadfile, in this order:
# --no-loadscope-reorder), and a long file started last would keep one worker busy while the other
# has nothing left.
LONGEST_FIRST = (
    "launch/test_submit.py",  # 395 s
    "launch/test_elastic.py",  # 304 s
    "parallel/test_strategies.py",  # 294 s
    "test_demo.py",  # 163 s
    "test_loop.py",  # 151 s
    "checkpoint/test_checkpointer_faults.py",  # 109 s
    "reporting/test_metrics_log.py",  # 101 s
    "checkpoint/test_checkpointer.py",  # 86 s
    "launch/test_elastic_chaos.py",  # 80 s
)
TESTS = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    position = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def start_order(item) -> int:
        return position.get(os.path.relpath(str(item.path), TESTS).replace(os.sep, "/"), len(LONGEST_FIRST))

    items.sort(key=start_order)  # stable: the other files keep their order after these
