"""Reading one record of a data file: finetrain's field names mapped to the file's, typed
field access, and the error a bad row raises (its caller adds the file and line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from trainer.runtime.errors import ConfigError

if TYPE_CHECKING:
    pass


DEFAULT_FIELDS = {
    "chat": {"messages": "messages", "role": "role", "content": "content", "tools": "tools",
             "tool_calls": "tool_calls", "reasoning": "reasoning_content"},
    "instruction": {"prompt": "prompt", "input": "input", "response": "response", "system": "system"},
    "text": {"text": "text"},
    "classification": {"text": "text", "label": "label"},
    "tokenized": {"input_ids": "input_ids", "labels": "labels"},
    "choice": {"context": "context", "choices": "choices", "answer": "answer", "labels": "labels"},
    # prompt, chosen, rejected: strings or lists of chat messages (role, content); margin: optional,
    # a reward model's Bradley-Terry margin
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "margin": "margin",
                   "role": "role", "content": "content"},
    "unpaired_preference": {"prompt": "prompt", "completion": "completion", "label": "label", "role": "role",
                            "content": "content"},
}






# The parts of an assistant turn that can train (`data.datasets.N.train_on`); all by default.
TRAIN_PARTS = ("content", "reasoning", "tool_calls")



TRAIN_ON_DEFAULT = TRAIN_PARTS



class RowError(ValueError):
    """What is wrong with one record; the caller prefixes its file and line."""



@dataclass
class Encoded:
    tokens: list[int] | np.ndarray
    targets: list[bool] | np.ndarray = field(default_factory=list)  # causal formats: which tokens are trained on
    label: int | str | None = None  # classification: raw label, mapped to an id when all are known
    # preference formats: the example's sequences, one after the other in `tokens` (a pair: chosen then
    # rejected); the margin of a pair (reward models), 0 when the row has none
    sequences: list[int] | None = None
    margin: float = 0.0



def field_names(fmt: str, mapping: dict, where: str) -> dict[str, str]:
    """finetrain's field names -> the file's, checking the mapping names real fields."""
    names = dict(DEFAULT_FIELDS[fmt])
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} for format {fmt}; known: {', '.join(names)}")
    for key, value in mapping.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.{key}: expected a field name, got {value!r}")
        names[key] = value
    return names



def get_field(record: dict, names: dict, key: str, kind: type | tuple, required: bool = True):
    name = names[key]
    shown = f'"{name}"' if name == key else f'"{name}" ({key})'
    if name not in record or record[name] is None:
        if required:
            raise RowError(f"missing field {shown}")
        return None
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RowError(f"field {shown} must be {expected}, got {type(value).__name__} {short_repr(value)}")
    return value



def short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
