"""Tokenizing a source into the cache: N worker processes, a chunk at a time, once per node.

`load_tokenized` returns a data set from the cache under `data.cache_dir`, tokenizing it
first on a miss. The cache key is the source's fingerprint (`source_fingerprint`), the
tokenizer, and every setting that changes the arrays; nothing depends on `data.seq_len`.

Rows are read in file order and encoded in chunks of `CHUNK_ROWS`, by worker processes
when there are several (each builds its encoder once), and written in file order as the
chunks come back; at most two chunks per worker are in flight, so memory is bounded by
the chunk size, not by the data. The first bad row in file order is the one reported.

Several processes (the ranks of a node, nodes sharing a file system, a `finetrain
prepare` beside a run) may want the same entry at once: a lock file lets one of them
tokenize while the others wait, and the folder is written aside and renamed into place
when complete, so no process ever reads a half-written entry, and an entry left half
written by a killed process is never used (the next holder of the lock removes it).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.data.formats import build_encoder
from trainer.data.records import TRAIN_ON_DEFAULT, RowError
from trainer.data.sources import Row, Source, location, read_rows, source_fingerprint
from trainer.data.tokenized import (EncodedChunk, TokenizedDataset, TokenizedWriter, is_complete, open_tokenized,
                                    prompt_key)
from trainer.runtime.errors import DataError

log = logging.getLogger("finetrain")

# Part of every cache key: bump it when the same source and settings would give other arrays
# (a change to the folder layout in tokenized.py or to an encoder in formats.py).
CACHE_VERSION = 4
# Rows per chunk sent to a worker: large enough that the transfer costs little next to
# encoding (a chat example takes a few hundred microseconds), small enough that chunks in
# flight stay a few MB even for long documents.
CHUNK_ROWS = 256


@dataclass(frozen=True)
class EncodingSpec:
    """How the records of one source become examples: all a worker process needs."""

    format: str
    names: dict
    train_on_prompt: bool
    tokenizer: PreTrainedTokenizerBase
    train_on: tuple = TRAIN_ON_DEFAULT  # the parts of assistant turns that train

    def encoder(self):
        return build_encoder(self.format, self.tokenizer, self.names, self.train_on_prompt, self.train_on)


def encode_chunk(encoder, rows: list[Row]) -> EncodedChunk:
    tokens, targets, lengths, numbers, keys, labels, problems = [], [], [], [], [], [], []
    splits, margins = [], []
    for row in rows:
        problem = row.error
        if problem is None:
            try:
                encoded = encoder.encode(row.record)
            except RowError as err:
                problem = str(err)
        if problem is not None:
            problems.append((row.number, problem))
            continue
        tokens.append(np.asarray(encoded.tokens, dtype=np.int64))
        targets.append(np.asarray(encoded.targets, dtype=bool))
        keys.append(prompt_key(tokens[-1], targets[-1]))
        lengths.append(len(encoded.tokens))
        numbers.append(row.number)
        labels.append(encoded.label)
        splits.append(encoded.sequences[0] if encoded.sequences else len(encoded.tokens))
        margins.append(encoded.margin)
    return EncodedChunk(by_line=rows[0].by_line, tokens=_joined(tokens, np.int64), targets=_joined(targets, bool),
                        lengths=np.asarray(lengths, dtype=np.int64), rows=np.asarray(numbers, dtype=np.int64),
                        prompt_keys=np.asarray(keys, dtype=np.uint64),
                        labels=labels, problems=problems, rows_read=len(rows),
                        pair_splits=np.asarray(splits, dtype=np.int64), margins=np.asarray(margins, dtype=np.float32))


def _joined(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


_worker_encoder = None


def _start_worker(spec: EncodingSpec) -> None:
    global _worker_encoder
    _worker_encoder = spec.encoder()


def _encode_in_worker(rows: list[Row]) -> EncodedChunk:
    return encode_chunk(_worker_encoder, rows)


def encoded_chunks(rows: Iterator[Row], spec: EncodingSpec, workers: int,
                   chunk_rows: int = CHUNK_ROWS) -> Iterator[EncodedChunk]:
    """The rows encoded chunk by chunk, in order. With `workers` > 1 a pool of fresh
    (spawned: forking a process that holds threads and a process group is unsafe)
    processes encodes them; a source of a single chunk is encoded here, since starting
    the pool would cost more than it saves."""
    chunks = iter(lambda: list(itertools.islice(rows, chunk_rows)), [])
    head = list(itertools.islice(chunks, 2))
    if workers <= 1 or len(head) < 2:
        encoder = spec.encoder()
        for chunk in itertools.chain(head, chunks):
            yield encode_chunk(encoder, chunk)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(spec,))
    try:
        in_flight: collections.deque = collections.deque()
        for chunk in itertools.chain(head, chunks):
            in_flight.append(pool.submit(_encode_in_worker, chunk))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Progress:
    """Examples read and examples/s of one source, on stderr (a bar when enabled, and one
    log line at the end either way)."""

    def __init__(self, source: str, enabled: bool):
        self.source = source
        self.start = time.perf_counter()
        self.count = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=f"tokenizing {source}", unit=" examples", file=sys.stderr, dynamic_ncols=True,
                            mininterval=1.0)

    def advance(self, rows: int) -> None:
        self.count += rows
        if self.bar is not None:
            self.bar.update(rows)

    def close(self) -> float:
        """Examples per second over the whole source."""
        if self.bar is not None:
            self.bar.close()
        return self.count / max(time.perf_counter() - self.start, 1e-9)


def tokenize_source(path: Source, source: str, spec: EncodingSpec, on_bad_row: str, folder: Path,
                    hf_cache_dir: Path | None = None, workers: int = 1, progress: bool = False,
                    chunk_rows: int = CHUNK_ROWS) -> None:
    """Encode every record of `path` into a new tokenized folder. A bad record raises
    DataError naming its line, or is skipped and counted (`on_bad_row: skip`). `source`
    is the name shown in messages."""
    writer = TokenizedWriter(folder, source, spec.format, len(spec.tokenizer))
    meter = Progress(source, progress)
    skipped, skipped_where = 0, []
    try:
        for chunk in encoded_chunks(read_rows(path, hf_cache_dir), spec, workers, chunk_rows):
            for number, problem in chunk.problems:
                where = location(source, number, chunk.by_line)
                if on_bad_row == "error":
                    raise DataError(f"{where}: {problem} (set data.on_bad_row=skip to skip bad rows)")
                skipped += 1
                if len(skipped_where) < 5:
                    skipped_where.append(f"{where}: {problem}")
            writer.add(chunk)
            meter.advance(chunk.rows_read)
        if writer.examples == 0:
            detail = f" ({skipped} bad rows skipped; first: {skipped_where[0]})" if skipped else ""
            raise DataError(f"{source}: no usable examples{detail}")
        writer.finish(skipped, skipped_where)
    finally:
        rate = meter.close()
        writer.close()  # on an error too: the caller removes the folder
    log.info("tokenized %s: %d examples, %d tokens, %.0f examples/s with %d worker(s)", source, writer.examples,
             writer.num_tokens, rate, workers)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything about a tokenizer that changes token ids or chat rendering."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    if tokenizer.is_fast:
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
             getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None), len(tokenizer)]
    digest.update(json.dumps(extra, default=str).encode())
    return digest.hexdigest()


def cache_folder(path: Source, source: str, spec: EncodingSpec, on_bad_row: str, cache_dir: Path) -> Path:
    key = hashlib.sha256(json.dumps({
        "version": CACHE_VERSION,
        "content": source_fingerprint(path),
        "tokenizer": tokenizer_fingerprint(spec.tokenizer),
        "format": spec.format,
        "fields": spec.names,
        "train_on_prompt": spec.train_on_prompt,
        "train_on": sorted(spec.train_on),
        "on_bad_row": on_bad_row,
        "source": source,
    }, sort_keys=True).encode()).hexdigest()
    return cache_dir / "tokenized" / f"{Path(source).name}-{key[:20]}"


@contextlib.contextmanager
def exclusive(lock_file: Path, waiting_message: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file`, waiting for any other holder. POSIX record
    locks (lockf) rather than flock: they also hold between the nodes of an NFS mount, and
    the kernel releases them when a holder dies. Lock files are never deleted (deleting
    one while a process waits on it would let a third process lock a new file alongside)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("%s", waiting_message)
            fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def load_tokenized(path: Source, source: str, spec: EncodingSpec, on_bad_row: str, cache_dir: Path,
                   workers: int = 1, progress: bool = False) -> TokenizedDataset:
    """The tokenized data set from the cache, tokenizing it on a miss (one process at a time)."""
    folder = cache_folder(path, source, spec, on_bad_row, cache_dir)
    if not is_complete(folder):
        lock = folder.parent / ".locks" / f"{folder.name}.lock"
        with exclusive(lock, f"waiting for another process tokenizing {source}"):
            if not is_complete(folder):
                for stale in folder.parent.glob(f".{folder.name}.partial-*"):  # left by a killed holder
                    shutil.rmtree(stale, ignore_errors=True)
                aside = folder.with_name(f".{folder.name}.partial-{socket.gethostname()}-{os.getpid()}")
                try:
                    tokenize_source(path, source, spec, on_bad_row, aside, cache_dir / "hf", workers, progress)
                    os.rename(aside, folder)
                finally:
                    shutil.rmtree(aside, ignore_errors=True)
    return open_tokenized(folder)
