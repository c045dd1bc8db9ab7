"""Reading the pickles in a checkpoint without running code from them.

torch's own files (`torch.save`: a zip whose `data.pkl` names the classes and functions that
rebuild its objects) are read with torch's weights-only unpickler, which admits tensors, plain
containers and numbers, and here only the few other classes a strategy's checkpoint is known to
hold (DeepSpeed's loss scaler, say). A file that names anything else (`os.system`, a class of
someone's choosing), or that is no such file at all, is refused in one line before any of it is
used: a checkpoint folder handed over by someone else runs nothing when loaded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Sequence

import torch

from trainer.runtime.errors import UserError


def load_plain(source: Path | io.BytesIO, what: str, allowed: Sequence[type] = (), mmap: bool = False):
    """`torch.load(source, weights_only=True)` admitting the classes `allowed` besides plain data;
    any failure refuses it, naming `what` (a file, or a value of one). `mmap`: tensors stay on
    disk, mapped (only the pickle that describes them is read: a check of a large file)."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # a file that is not what it should be, whatever the reader trips on
        raise UserError(f"{what}: holds more than plain data ({refusal_reason(err)}); refusing to load it "
                        "(loading a checkpoint runs no code from it)") from None


def refusal_reason(err: Exception) -> str:
    """Why torch's weights-only unpickler (or the reader before it) refused a file, in a phrase."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            rest = line.removeprefix("WeightsUnpickler error:").strip()
            return rest or (lines[index + 1] if index + 1 < len(lines) else "unsupported content")
        if "GLOBAL" in line or line.startswith("Unsupported"):  # what the file names that is not allowed
            return line.rstrip(".")
    if not lines:
        return type(err).__name__
    if "mmap" in lines[0] or "zip" in lines[0] or "central directory" in lines[0]:
        return "not a file written by torch.save"
    return lines[0][:200]
