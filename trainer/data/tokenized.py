"""Tokenized data sets as flat arrays on disk, memory-mapped read-only by every rank.

A tokenized data set is a folder of raw arrays and a `meta.json` that describes them:

    tokens.<uint16|int32>  every example's token ids, concatenated (uint16 when the
                           vocabulary fits: half the disk and page cache)
    targets.bool           per token, whether it is trained on; absent when every token
                           is (text, continued pretraining) or none is (classification)
    offsets.int64          example i is tokens[offsets[i]:offsets[i+1]]
    rows.int64             the source line (or row) of each example, for messages
    prompt_keys.uint64     per example, a hash of its prompt (the tokens before its first
                           target; the whole example when it has no prompt): examples that
                           share a held-out example's prompt are kept out of training
    labels.int32           classification (and unpaired preference: desirable or not): each
                           example's label, an index into the `label_values` of meta.json
                           (the distinct raw labels)
    pair_splits.int64      preference pairs: the tokens of each example's first (chosen)
                           sequence; the rest of the example is the rejected one
    margins.float32        preference pairs: each pair's margin (0 where the row has none)

The ranks of a node map these files, so the node holds one copy in its page cache and no
rank holds any in its heap, whatever the size of the data. `TokenizedWriter` appends
examples a chunk at a time, so writing needs memory for one chunk only.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.data.sources import location

META = "meta.json"
# Formats whose examples carry a label (labels.int32), and those whose examples are pairs of sequences.
LABELLED_FORMATS = ("classification", "unpaired_preference")
PAIRED_FORMATS = ("preference",)


@dataclass
class TokenizedDataset:
    """Examples of one source; the arrays are memory-mapped files or, in tests, in memory."""

    source: str
    format: str
    tokens: np.ndarray  # uint16 or int32
    offsets: np.ndarray  # int64, one more than there are examples
    targets: np.ndarray  # bool per token: a file, all True (a zero-stride view) or empty (classification)
    rows: np.ndarray  # int64: the source line or row of each example
    prompt_keys: np.ndarray  # uint64: a hash of each example's prompt (see prompt_key)
    by_line: bool
    label_values: list = field(default_factory=list)  # classification: the distinct raw labels
    label_index: np.ndarray | None = None  # classification: per example, an index into label_values
    pair_splits: np.ndarray | None = None  # preference pairs: per example, its chosen sequence's tokens
    margins: np.ndarray | None = None  # preference pairs: per example, its margin
    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)  # the first few, for the warning
    folder: Path | None = None  # where the arrays are mapped from (None: in memory)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1]) - int(self.offsets[i])

    def example_tokens(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def example_targets(self, i: int) -> np.ndarray:
        return self.targets[self.offsets[i]: self.offsets[i + 1]]

    def label(self, i: int):
        """The raw label of example i (classification): an int or a class name."""
        return self.label_values[int(self.label_index[i])]

    def where(self, i: int) -> str:
        return location(self.source, int(self.rows[i]), self.by_line)

    def length_blocks(self, block: int = 1 << 18) -> Iterator[tuple[int, np.ndarray]]:
        """(first example, lengths) of consecutive blocks of examples. The offsets are read
        with ordinary file reads rather than through the mapping, so a scan of every
        example does not leave the whole offsets file in this process's resident memory."""
        for start in range(0, len(self), block):
            stop = min(start + block, len(self))
            yield start, np.diff(self._read("offsets.int64", self.offsets, start, stop + 1))

    def examples_with_label(self, value_index: int, block: int = 1 << 18) -> np.ndarray:
        """Examples whose label is `label_values[value_index]` (for messages about one)."""
        found = [start + np.flatnonzero(self._read("labels.int32", self.label_index, start,
                                                   min(start + block, len(self))) == value_index)
                 for start in range(0, len(self), block)]
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def examples_with_prompt_keys(self, keys: np.ndarray, block: int = 1 << 18) -> np.ndarray:
        """Examples whose prompt key is one of `keys`, read in blocks (see length_blocks)."""
        found = [start + np.flatnonzero(np.isin(self._read("prompt_keys.uint64", self.prompt_keys, start,
                                                           min(start + block, len(self))), keys))
                 for start in range(0, len(self), block)]
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def _read(self, file: str, array: np.ndarray, start: int, stop: int) -> np.ndarray:
        """array[start:stop], read from its file when it is mapped (see length_blocks)."""
        if self.folder is None:
            return np.asarray(array[start:stop])
        return np.fromfile(self.folder / file, dtype=array.dtype, count=stop - start, offset=start * array.itemsize)


@dataclass
class EncodedChunk:
    """Consecutive rows of a source, encoded: the good examples as flat arrays, and the
    bad rows as (row number, what is wrong), in source order."""

    by_line: bool
    tokens: np.ndarray  # int64
    targets: np.ndarray  # bool per token (empty for classification)
    lengths: np.ndarray  # int64 per example
    rows: np.ndarray  # int64 per example
    prompt_keys: np.ndarray  # uint64 per example
    labels: list  # classification: the raw label of each example
    problems: list[tuple[int, str]]
    rows_read: int  # good and bad
    pair_splits: np.ndarray | None = None  # int64 per example: its first sequence's tokens (preference)
    margins: np.ndarray | None = None  # float32 per example (preference)


def prompt_key(tokens: np.ndarray, targets: np.ndarray) -> int:
    """A 64-bit hash of an example's prompt: its tokens before the first target, or all of
    them when the first token is a target or none is (text, classification)."""
    first_target = int(np.argmax(targets)) if len(targets) and targets.any() else 0
    prompt = tokens[:first_target] if first_target else tokens
    digest = hashlib.blake2b(np.ascontiguousarray(prompt, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class TokenizedWriter:
    """Appends encoded chunks to the array files of `folder`; `finish` writes meta.json,
    which marks the folder complete."""

    def __init__(self, folder: Path, source: str, fmt: str, vocab_size: int):
        self.folder = folder
        self.source = source
        self.format = fmt
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        folder.mkdir(parents=True)
        self.files = {name: open(folder / name, "wb") for name in
                      (f"tokens.{self.dtype.name}", "targets.bool", "offsets.int64", "rows.int64",
                       "prompt_keys.uint64", "labels.int32", "pair_splits.int64", "margins.float32")}
        self.files["offsets.int64"].write(np.zeros(1, dtype=np.int64).tobytes())
        self.examples = 0
        self.num_tokens = 0
        self.every_token_a_target = True
        self.label_ids: dict = {}  # raw label -> index into label_values
        self.by_line = True

    def add(self, chunk: EncodedChunk) -> None:
        self.by_line = chunk.by_line
        if not len(chunk.lengths):
            return
        if chunk.tokens.max() > np.iinfo(self.dtype).max:  # a tokenizer with ids beyond its length
            raise ValueError(f"{self.source}: token id {chunk.tokens.max()} does not fit {self.dtype.name}, "
                             f"chosen for the tokenizer's {self.vocab_size} tokens")
        chunk.tokens.astype(self.dtype).tofile(self.files[f"tokens.{self.dtype.name}"])
        chunk.targets.tofile(self.files["targets.bool"])
        self.every_token_a_target &= bool(chunk.targets.all())
        (self.num_tokens + np.cumsum(chunk.lengths)).astype(np.int64).tofile(self.files["offsets.int64"])
        chunk.rows.astype(np.int64).tofile(self.files["rows.int64"])
        chunk.prompt_keys.astype(np.uint64).tofile(self.files["prompt_keys.uint64"])
        if self.format in LABELLED_FORMATS:
            ids = [self.label_ids.setdefault(value, len(self.label_ids)) for value in chunk.labels]
            np.asarray(ids, dtype=np.int32).tofile(self.files["labels.int32"])
        if self.format in PAIRED_FORMATS:
            chunk.pair_splits.astype(np.int64).tofile(self.files["pair_splits.int64"])
            chunk.margins.astype(np.float32).tofile(self.files["margins.float32"])
        self.examples += len(chunk.lengths)
        self.num_tokens += int(chunk.lengths.sum())

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def finish(self, skipped: int, skipped_where: list[str]) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())  # on disk before the folder is renamed into place
        self.close()
        targets = "none" if self.format == "classification" else "all" if self.every_token_a_target else "file"
        if targets != "file":
            (self.folder / "targets.bool").unlink()
        if self.format not in LABELLED_FORMATS:
            (self.folder / "labels.int32").unlink()
        if self.format not in PAIRED_FORMATS:
            (self.folder / "pair_splits.int64").unlink()
            (self.folder / "margins.float32").unlink()
        meta = {"source": self.source, "format": self.format, "by_line": self.by_line,
                "examples": self.examples, "tokens": self.num_tokens, "token_dtype": self.dtype.name,
                "targets": targets, "label_values": list(self.label_ids),
                "skipped": skipped, "skipped_where": skipped_where}
        aside = self.folder / f".{META}"
        aside.write_text(json.dumps(meta))
        os.replace(aside, self.folder / META)


def is_complete(folder: Path) -> bool:
    return (folder / META).is_file()


def open_tokenized(folder: Path) -> TokenizedDataset:
    """Map a complete folder's arrays read-only."""
    meta = json.loads((folder / META).read_text())
    n, count = meta["examples"], meta["tokens"]

    def mapped(name: str, dtype, length: int) -> np.ndarray:
        """A read-only array over the file's pages (a plain ndarray: indexing an np.memmap
        goes through Python code, which the stream would pay for every example)."""
        if length == 0:  # an empty file cannot be mapped
            return np.empty(0, dtype=dtype)
        with open(folder / name, "rb") as f:
            pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # Examples are drawn in shuffled order: reading ahead of a fault would fetch
        # neighbours nobody asked for when the data is larger than the page cache.
        pages.madvise(mmap.MADV_RANDOM)
        return np.frombuffer(pages, dtype=dtype, count=length)

    targets = {"file": lambda: mapped("targets.bool", np.bool_, count),
               "all": lambda: np.broadcast_to(np.True_, (count,)),  # no memory, any length
               "none": lambda: np.empty(0, dtype=np.bool_)}[meta["targets"]]()
    labelled, paired = meta["format"] in LABELLED_FORMATS, meta["format"] in PAIRED_FORMATS
    return TokenizedDataset(
        source=meta["source"], format=meta["format"],
        tokens=mapped(f"tokens.{meta['token_dtype']}", np.dtype(meta["token_dtype"]), count),
        offsets=mapped("offsets.int64", np.int64, n + 1), targets=targets,
        rows=mapped("rows.int64", np.int64, n), prompt_keys=mapped("prompt_keys.uint64", np.uint64, n),
        by_line=meta["by_line"],
        label_values=meta["label_values"], label_index=mapped("labels.int32", np.int32, n) if labelled else None,
        pair_splits=mapped("pair_splits.int64", np.int64, n) if paired else None,
        margins=mapped("margins.float32", np.float32, n) if paired else None,
        skipped=meta["skipped"], skipped_where=meta["skipped_where"], folder=folder)
