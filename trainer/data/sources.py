"""Rows from data files, each with the place it came from, so a bad row is reported by
file and line (JSON Lines) or row (JSON arrays, CSV, Parquet, `save_to_disk` folders).

JSON Lines are read line by line here rather than through `datasets`, whose JSON reader
reports a malformed line without its number. Columnar formats go through `datasets`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from trainer.config import UserError


class DataError(UserError):
    """Bad input data; the message starts with the file and line or row."""


@dataclass(frozen=True)
class Row:
    """A raw record, or the reason it could not be read (`error`, with `record` None)."""

    number: int  # 1-based line (JSON Lines) or row (other formats)
    by_line: bool
    record: dict | None
    error: str | None = None


def location(path: str | Path, number: int, by_line: bool) -> str:
    """`data/sft.jsonl:17` for a line, `data/sft.parquet: row 17` for a row."""
    return f"{path}:{number}" if by_line else f"{path}: row {number}"


def read_rows(path: str | Path, hf_cache_dir: Path | None = None) -> Iterator[Row]:
    """Every record of a data file or `save_to_disk` folder, in file order."""
    path = Path(path)
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_json_lines(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix in (".csv", ".parquet"):
        yield from _read_with_datasets(path, suffix.lstrip("."), hf_cache_dir)
    else:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json, .csv, .parquet "
                        "or a folder written by datasets' save_to_disk")


def _read_json_lines(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Row(lineno, True, None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield Row(lineno, True, None, f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(record, dict):
                yield Row(lineno, True, None, f"expected a JSON object, got {type(record).__name__}")
                continue
            yield Row(lineno, True, record)


def _read_json(path: Path) -> Iterator[Row]:
    """A JSON array of objects, an object holding one such array, or JSON Lines named .json."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{") and err.msg == "Extra data":
            yield from _read_json_lines(path)
            return
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of records, or an object holding exactly one array")
        document = lists[0]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(document).__name__}")
    for index, record in enumerate(document, start=1):
        if isinstance(record, dict):
            yield Row(index, False, record)
        else:
            yield Row(index, False, None, f"expected a JSON object, got {type(record).__name__}")


def _read_with_datasets(path: Path, kind: str, hf_cache_dir: Path | None) -> Iterator[Row]:
    import datasets

    if kind == "csv":
        _check_utf8_lines(path)
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train",
                                      cache_dir=str(hf_cache_dir) if hf_cache_dir else None)
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise DataError(f"{path}: cannot read as {kind}: {err}") from None
    for index, record in enumerate(table, start=1):
        yield Row(index, False, record)


def _read_saved_dataset(path: Path) -> Iterator[Row]:
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError, or datasets' own errors for a foreign folder
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({err})") from None
    if isinstance(saved, datasets.DatasetDict):
        if "train" in saved:
            saved = saved["train"]
        elif len(saved) == 1:
            saved = next(iter(saved.values()))
        else:
            raise DataError(f"{path}: a DatasetDict with splits {list(saved)} and no 'train' split")
    for index, record in enumerate(saved, start=1):
        yield Row(index, False, record)


def _check_utf8_lines(path: Path) -> None:
    """The CSV reader fails on the first undecodable byte without saying where; find the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} "
                                f"at column {err.start + 1})") from None


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files with their relative names."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
