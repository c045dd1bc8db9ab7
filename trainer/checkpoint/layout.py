"""A run's checkpoint folders: `checkpoints/step-00000042/` sealed by a `COMPLETE` mark that
lists every file with its size and checksum; finding the complete ones, reading the mark,
checking a folder against it."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from trainer.checkpoint.checksums import share_of, verify_files
from trainer.runtime.errors import UserError

log = logging.getLogger("finetrain")


COMPLETE_MARK = "COMPLETE"



_STEP_DIR = re.compile(r"^step-(\d{8})$")



def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"



def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARK).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]



def read_mark(path: Path) -> dict:
    mark = path / COMPLETE_MARK
    if not mark.is_file():
        raise UserError(f"{path}: not a complete checkpoint (no {COMPLETE_MARK} mark)")
    try:
        content = json.loads(mark.read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"{mark}: unreadable ({err})") from None
    if not isinstance(content, dict) or "format" not in content:
        raise UserError(f"{mark}: not a checkpoint's mark")
    return content



def checkpoint_problem(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """What is wrong with the checkpoint `path` (its mark, or the first file of this rank's
    share that is missing or fails its checksum), or None. A checkpoint written before
    checksums passes with a warning."""
    try:
        mark = read_mark(path)
    except UserError as err:
        return str(err)
    files = mark.get("files")
    if files is None:
        if rank == 0:
            log.warning("%s was written before checkpoints carried checksums: not verified", path)
        return None
    return verify_files(path, files, share_of(files, rank, world_size))



def checkpoint_bytes(path: Path) -> int:
    """The size of a checkpoint: from its mark, else by walking it."""
    try:
        files = read_mark(path).get("files")
    except UserError:
        files = None
    if files is not None:
        return sum(entry["size"] for entry in files.values())
    return folder_bytes(path)



def folder_bytes(path: Path) -> int:
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file():
                total += item.stat().st_size
        except OSError:
            continue
    return total
