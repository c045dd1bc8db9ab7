"""Checksums of a checkpoint's files: computed as they are sealed, verified before any is loaded.

The COMPLETE mark of a checkpoint lists every file in it with its size and an XXH3-128 digest
(`xxhash`, several GB/s: a check against corruption on disk or in transfer, not against a
forger, who could rewrite the mark too; loading runs no code from the folder either way). Each
rank sums the shards it wrote itself, in the background after its write (their pages are still
in its node's cache), and rank 0 the rest as it seals; resume spreads the verification over the
ranks, `finetrain export` verifies in its one process.
"""

from __future__ import annotations

import re
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
_CHUNK = 8 << 20
# Shards named after the rank that writes them: DCP's `__<rank>_<n>.distcp`, DeepSpeed's
# `[bf16_]zero_pp_rank_<rank>_mp_rank_00_*`. Every other file is rank 0's to sum.
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$|zero_pp_rank_(\d+)_")


def file_checksum(path: Path) -> tuple[int, str]:
    """(bytes read, hex digest) of one file, read in large chunks (hashing releases the GIL)."""
    digest = xxhash.xxh3_128()
    size = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            count = f.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
            size += count
    return size, digest.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def written_by(name: str, world_size: int) -> int:
    """The rank whose write produced the file `name` (a path relative to the checkpoint)."""
    match = _RANK_FILE.search(Path(name).name)
    if match is None:
        return 0
    rank = int(match.group(1) or match.group(2))
    return rank if rank < world_size else 0


def sum_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "checksum"}} of the given files of `folder`."""
    sums = {}
    for name in names:
        size, digest = file_checksum(folder / name)
        sums[name] = {"size": size, "checksum": digest}
    return sums


def sum_own_files(folder: Path, rank: int, world_size: int) -> dict[str, dict]:
    """The checksums of the files this rank wrote into `folder` (after its write finished)."""
    return sum_files(folder, [n for n in checkpoint_files(folder) if written_by(n, world_size) == rank])


def share_of(files: dict[str, dict], rank: int, world_size: int) -> list[str]:
    """This rank's part of a verification: the files dealt out largest first to the rank
    with the fewest bytes so far, the same split on every rank."""
    loads = [0] * world_size
    mine = []
    for name, entry in sorted(files.items(), key=lambda item: (-item[1]["size"], item[0])):
        target = loads.index(min(loads))
        loads[target] += entry["size"]
        if target == rank:
            mine.append(name)
    return mine


def verify_files(folder: Path, files: dict[str, dict], names: list[str] | None = None) -> str | None:
    """The first of `names` (default: all listed) that is missing or differs from its entry in
    `files`, with what differs; None when all match."""
    for name in sorted(files if names is None else names):
        expected = files[name]
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual_size = path.stat().st_size
        if actual_size != expected["size"]:
            return f"{name} has {actual_size:,} bytes, its checksum entry {expected['size']:,}"
        if file_checksum(path)[1] != expected["checksum"]:
            return f"{name} does not match its checksum"
    return None
