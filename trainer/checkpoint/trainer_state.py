"""The trainer's own state in a checkpoint: what resume needs besides the weights.

Step, data loader position, counters, forgetting monitor, run summary and W&B run id, as
`trainer_state.json`, with its tensors (the counters) in `trainer_state.safetensors`: reading
either runs no code. Tuples come back as lists, which every `load_state_dict` accepts.
Checkpoints written before this format hold `trainer_state.pt`, a pickle: it is read with
torch's weights-only unpickler and refused when it holds more than plain data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.parallel.safe_load import load_plain
from trainer.runtime.errors import UserError

TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
LEGACY_TRAINER_STATE = "trainer_state.pt"


def encode_trainer_state(state: dict) -> dict[str, bytes]:
    """The trainer state as JSON, its tensors apart in safetensors: {file name: bytes}."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}

    def encode(value, key: str):
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"trainer state {key}: JSON keys must be strings, got {list(value)[:5]}")
            return {k: encode(v, f"{key}.{k}" if key else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{key}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) or hasattr(value, "__index__"):
            return int(value)
        if isinstance(value, float) or hasattr(value, "__float__"):
            return float(value)
        raise TypeError(f"trainer state {key}: a {type(value).__name__} has no JSON form")

    document = encode(state, "")
    return {TRAINER_STATE: json.dumps(document).encode(), TRAINER_TENSORS: save(tensors)}


def read_trainer_state(path: Path) -> dict:
    """The trainer state of checkpoint `path`; a checkpoint of the earlier format (a pickle)
    is read with torch's weights-only unpickler, and refused if it holds more than data."""
    if (path / TRAINER_STATE).is_file():
        from safetensors.torch import load

        try:
            document = json.loads((path / TRAINER_STATE).read_text())
            tensors = load((path / TRAINER_TENSORS).read_bytes())
        except (ValueError, OSError) as err:
            raise UserError(f"{path / TRAINER_STATE}: unreadable ({err})") from None

        def decode(value):
            if isinstance(value, dict):
                if set(value) == {"__tensor__"}:
                    return tensors[value["__tensor__"]]
                return {k: decode(v) for k, v in value.items()}
            if isinstance(value, list):
                return [decode(v) for v in value]
            return value

        return decode(document)
    legacy = path / LEGACY_TRAINER_STATE
    if legacy.is_file():
        return load_plain(legacy, str(legacy))
    raise UserError(f"{path}: no trainer state ({TRAINER_STATE})")

