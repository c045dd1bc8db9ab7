"""docs/config.md is rendered from the schema (trainer/config/reference.py): it must be what the
schema renders today, and name every key a config can set."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

from trainer.config.reference import list_item, render_reference
from trainer.config.schema import Config
from trainer.config.tree import field_key

REPO = Path(__file__).resolve().parents[2]


def leaf_keys(cls, prefix: str = "") -> list[str]:
    """Every key that holds a value (not a section), list items numbered N."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = prefix + field_key(f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += leaf_keys(hint, key + ".")
        elif list_item(hint):
            keys += leaf_keys(list_item(hint), key + ".N.")
        else:
            keys.append(key)
    return keys


def test_docs_config_md_is_what_the_schema_renders():
    page = (REPO / "docs" / "config.md").read_text()
    assert page == render_reference(), "docs/config.md differs from the schema's reference: run `make docs`"


def test_every_leaf_key_of_the_config_has_a_row():
    text = render_reference()
    keys = leaf_keys(Config)
    assert "checkpoint.async" in keys and "data.eval.sets.N.forgetting" in keys and "logging.wandb.mode" in keys
    missing = [key for key in keys if f"| `{key}` |" not in text]
    assert not missing, f"keys without a row in the config reference: {missing}"


def test_the_reference_renders_without_torch():
    code = "import sys, trainer.config.reference; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
