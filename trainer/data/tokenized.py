"""Tokenized data sets and their on-disk cache.

A data set is tokenized once into flat arrays (token ids, target flags, example
offsets) and saved under `data.cache_dir`, keyed by the file's content hash, the
tokenizer, the format and every setting that changes the result; a second run (and
every rank after the first) loads the arrays at once. Nothing here depends on
`data.seq_len`: over-long examples are handled when the loader is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.data.formats import RowError, build_encoder
from trainer.data.sources import DataError, content_hash, location, read_rows

log = logging.getLogger("finetrain")

CACHE_VERSION = 1
_MEMO: dict[str, "TokenizedDataset"] = {}


@dataclass
class TokenizedDataset:
    """Examples of one source as flat arrays: example i is tokens[offsets[i]:offsets[i+1]]."""

    source: str
    format: str
    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64, one more than there are examples
    targets: np.ndarray  # bool, per token (empty for classification)
    labels: list  # classification: the raw label of each example (int or class name)
    rows: np.ndarray  # int64: the source line or row of each example
    by_line: bool
    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)  # the first few, for the warning

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example_tokens(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def example_targets(self, i: int) -> np.ndarray:
        return self.targets[self.offsets[i]: self.offsets[i + 1]]

    def where(self, i: int) -> str:
        return location(self.source, int(self.rows[i]), self.by_line)


def tokenize_source(path: Path, source: str, fmt: str, names: dict, tokenizer: PreTrainedTokenizerBase,
                    train_on_prompt: bool, on_bad_row: str, hf_cache_dir: Path | None = None) -> TokenizedDataset:
    """Encode every record of `path`; a bad record raises DataError naming its line, or is
    skipped and counted (`on_bad_row: skip`). `source` is the name shown in messages."""
    encoder = build_encoder(fmt, tokenizer, names, train_on_prompt)
    tokens: list[int] = []
    targets: list[bool] = []
    offsets, labels, rows = [0], [], []
    skipped_where: list[str] = []
    by_line = True
    for row in read_rows(path, hf_cache_dir):
        by_line = row.by_line
        problem = row.error
        if problem is None:
            try:
                encoded = encoder.encode(row.record)
            except RowError as err:
                problem = str(err)
        if problem is not None:
            where = location(source, row.number, row.by_line)
            if on_bad_row == "error":
                raise DataError(f"{where}: {problem} (set data.on_bad_row=skip to skip bad rows)")
            skipped_where.append(f"{where}: {problem}")
            continue
        tokens.extend(encoded.tokens)
        targets.extend(encoded.targets)
        offsets.append(len(tokens))
        labels.append(encoded.label)
        rows.append(row.number)
    if len(rows) == 0:
        detail = f" ({len(skipped_where)} bad rows skipped; first: {skipped_where[0]})" if skipped_where else ""
        raise DataError(f"{source}: no usable examples{detail}")
    return TokenizedDataset(
        source=source,
        format=fmt,
        tokens=np.asarray(tokens, dtype=np.int32),
        offsets=np.asarray(offsets, dtype=np.int64),
        targets=np.asarray(targets, dtype=bool),
        labels=labels if fmt == "classification" else [],
        rows=np.asarray(rows, dtype=np.int64),
        by_line=by_line,
        skipped=len(skipped_where),
        skipped_where=skipped_where[:5],
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything about a tokenizer that changes token ids or chat rendering."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    if tokenizer.is_fast:
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
             getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]
    digest.update(json.dumps(extra, default=str).encode())
    return digest.hexdigest()


def load_tokenized(path: Path, source: str, fmt: str, names: dict, tokenizer: PreTrainedTokenizerBase,
                   train_on_prompt: bool, on_bad_row: str, cache_dir: Path) -> TokenizedDataset:
    """The tokenized data set from the cache, tokenizing and saving it on a miss."""
    key = hashlib.sha256(json.dumps({
        "version": CACHE_VERSION,
        "content": content_hash(path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": fmt,
        "fields": names,
        "train_on_prompt": train_on_prompt,
        "on_bad_row": on_bad_row,
        "source": source,
    }, sort_keys=True).encode()).hexdigest()
    if key in _MEMO:
        return _MEMO[key]
    file = cache_dir / "tokenized" / f"{Path(source).name}-{key[:20]}.npz"
    if file.is_file():
        dataset = _read(file)
    else:
        dataset = tokenize_source(path, source, fmt, names, tokenizer, train_on_prompt, on_bad_row, cache_dir / "hf")
        _write(file, dataset)
        log.info("tokenized %s: %d examples, %d tokens (cached in %s)", source, len(dataset), len(dataset.tokens), file)
    _MEMO[key] = dataset
    return dataset


def _write(file: Path, dataset: TokenizedDataset) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source": dataset.source, "format": dataset.format, "labels": dataset.labels, "by_line": dataset.by_line,
            "skipped": dataset.skipped, "skipped_where": dataset.skipped_where}
    fd, aside = tempfile.mkstemp(prefix=f".{file.stem}.", suffix=".npz", dir=file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, tokens=dataset.tokens, offsets=dataset.offsets, targets=dataset.targets, rows=dataset.rows,
                     meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        os.replace(aside, file)
    finally:
        if os.path.exists(aside):
            os.unlink(aside)


def _read(file: Path) -> TokenizedDataset:
    with np.load(file, allow_pickle=False) as arrays:
        meta = json.loads(arrays["meta"].tobytes().decode())
        return TokenizedDataset(tokens=arrays["tokens"], offsets=arrays["offsets"], targets=arrays["targets"],
                                rows=arrays["rows"], **meta)
