"""Rows from data files, each with the place it came from, so a bad row is reported by
file and line (JSON Lines) or row (JSON arrays, CSV, Parquet, `save_to_disk` folders).

Every reader streams, so a source larger than memory is read a record at a time: JSON
Lines line by line (rather than through `datasets`, whose JSON reader reports a malformed
line without its number), Parquet a row group batch at a time through pyarrow, CSV through
`datasets` (which converts it once into memory-mapped Arrow files), `save_to_disk` folders
straight from their memory-mapped Arrow files. A `.json` array is the exception: JSON has
no record boundaries to stream by, so it is parsed whole; large data belongs in JSON Lines
or Parquet.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from trainer.data.records import short_repr
from trainer.runtime.errors import DataError, decode_utf8


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


# What `read_rows` reads, besides `save_to_disk` folders.
READABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# A data file or folder, or several files read one after another (a split of a hub data set).
Source = Union[str, Path, tuple[Path, ...]]


def read_rows(path: Source, hf_cache_dir: Path | None = None) -> Iterator[Row]:
    """Every record of a data file or `save_to_disk` folder, in file order; of several files, in
    their order, numbered as rows through all of them."""
    if isinstance(path, tuple):
        yield from _read_files(path, hf_cache_dir)
        return
    path = Path(path)
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_json_lines(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".csv":
        yield from _read_csv(path, hf_cache_dir)
    else:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use {', '.join(READABLE_SUFFIXES)} "
                        "or a folder written by datasets' save_to_disk")


def _read_files(files: tuple[Path, ...], hf_cache_dir: Path | None) -> Iterator[Row]:
    """The rows of each file in turn, numbered through all of them; a row that cannot be read
    names its own file and line."""
    number = 0
    for file in files:
        for row in read_rows(file, hf_cache_dir):
            number += 1
            error = row.error and f"{row.error} ({location(file, row.number, row.by_line)})"
            yield Row(number, False, row.record, error)


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
            except RecursionError:
                yield Row(lineno, True, None, "not readable JSON (values nested too deeply)")
                continue
            if not isinstance(record, dict):
                yield Row(lineno, True, None, f"expected a JSON object, got {type(record).__name__}")
                continue
            problem = text_problem(record) if _SURROGATE_ESCAPE.search(line) else None
            yield Row(lineno, True, None if problem else record, problem)


def _read_json(path: Path) -> Iterator[Row]:
    """A JSON array of objects, an object holding one such array, or JSON Lines named .json."""
    text = decode_utf8(path.read_bytes(), path, DataError)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{") and err.msg == "Extra data":
            yield from _read_json_lines(path)
            return
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: not readable JSON (values nested too deeply)") from None
    check_text = bool(_SURROGATE_ESCAPE.search(text))
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of records, or an object holding exactly one array")
        document = lists[0]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(document).__name__}")
    for index, record in enumerate(document, start=1):
        if isinstance(record, dict):
            problem = text_problem(record) if check_text else None
            yield Row(index, False, None if problem else record, problem)
        else:
            yield Row(index, False, None, f"expected a JSON object, got {type(record).__name__}")


# A JSON escape of a UTF-16 surrogate (U+D800-U+DFFF): in a pair it is one character beyond the
# Basic Multilingual Plane (an emoji), alone it decodes to a string that is no Unicode text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def text_problem(record: dict) -> str | None:
    """What makes a decoded JSON record no text (a lone surrogate, which no tokenizer can encode
    and UTF-8 cannot hold), or None. Looked for only in lines that escape a surrogate."""
    pending = [record]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending += value.keys()
            pending += value.values()
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # repr escapes the surrogate, so the message itself stays printable text
                return f"not valid Unicode text (a lone surrogate in the string {short_repr(value)})"
    return None


PARQUET_BATCH_ROWS = 1024


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                index += 1
                yield Row(index, False, record)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read as parquet (after row {index}): {err}") from None


def _read_csv(path: Path, hf_cache_dir: Path | None) -> Iterator[Row]:
    import datasets

    _check_utf8_lines(path)
    try:
        table = datasets.load_dataset("csv", data_files=str(path), split="train",
                                      cache_dir=str(hf_cache_dir) if hf_cache_dir else None)
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise DataError(f"{path}: cannot read as csv: {err}") from None
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


# Bytes hashed at each end of a file for its fingerprint.
FINGERPRINT_EDGE_BYTES = 1 << 20


def source_fingerprint(path: Source) -> str:
    """What identifies a data file's content in the tokenization cache, without reading it all.

    Hashing a multi-GB file would cost seconds to minutes at every launch. Instead: each
    file's size, modification time (nanoseconds) and the SHA-256 of its first and last MiB
    (all of it when smaller than 2 MiB). Every ordinary way of changing a file (an editor,
    a rewrite, an append, a copy over it) changes its modification time or size; the key
    misses only a different file of the same size and the same edges whose modification
    time was set back to the old file's on purpose (`touch -d`, `cp -p` of a different
    file). A miss costs one re-tokenization, never wrong data; after such a copy delete the
    cache's `tokenized/` folder. A folder (`save_to_disk`) is the fingerprint of its files
    with their relative names; several files, the fingerprint of theirs in order."""
    if isinstance(path, tuple):
        return hashlib.sha256("\0".join(source_fingerprint(file) for file in path).encode()).hexdigest()
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(FINGERPRINT_EDGE_BYTES))
            if stat.st_size > FINGERPRINT_EDGE_BYTES:
                f.seek(max(FINGERPRINT_EDGE_BYTES, stat.st_size - FINGERPRINT_EDGE_BYTES))
                digest.update(f.read())
    return digest.hexdigest()
