"""Read back the records of a W&B offline run file (`run-<id>.wandb`).

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then
32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type), holding
serialized `wandb_internal_pb2.Record` messages. Tests use it to check what a
run sent to W&B without a server.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def run_history(run_dir: Path) -> tuple[str, list[dict]]:
    """(run id, history rows) of every offline run file under `run_dir`/wandb."""
    run_ids, rows = set(), []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
            elif kind == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
    assert len(run_ids) == 1, f"expected one W&B run id, found {run_ids}"
    return run_ids.pop(), rows
