"""The global row stream: mixing schedule -> per-data-set shuffles -> pieces -> rows.

Every rank computes the same stream (the tokenized data is memory-mapped, the rest is
cheap bookkeeping) and takes its own rows of each optimizer step, so the stream and its
state do not depend on the world size and resume is exact on any number of ranks. The
stream works on example ids and the offsets of the mapped arrays: nothing it holds, and
nothing in its state, grows with the number of examples.

At the end of each epoch of the primary data set (the one with the largest weight) the
packer's buffer is drained before the next epoch begins, so an epoch is a clean pass
over the primary data set and no example of epoch e+1 is packed ahead of one of epoch e.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.mixing import DatasetOrder, MixingSchedule, primary_index
from trainer.data.packing import Piece, RowPacker, split_example
from trainer.data.preference_rows import pair_lengths
from trainer.data.tokenized import TokenizedDataset
from trainer.runtime.errors import ConfigError

# Pieces the packer looks ahead over, and the rows a piece may wait before it opens a
# row. A larger buffer packs a little tighter but lets the packed stream drift further
# from the mixing schedule (by up to the buffer's size in examples): 32 keeps windows
# of 1,000 packed examples within about 1 % of the weights and packs chat above 95 %.
PACK_BUFFER = 32
PACK_MAX_WAIT = 8
# Bump when the same data and settings would give other rows (it keys cached epoch counts).
STREAM_VERSION = 1


class ExampleSet:
    """The examples 0..size-1 of a data set but a few excluded ones (over-long examples
    dropped, held-out ones), in order. The k-th is computed from the sorted exclusions, so
    the set costs memory for its exclusions only, not for every example."""

    def __init__(self, size: int, excluded=()):
        self.size = size
        self.excluded = np.unique(np.asarray(excluded, dtype=np.int64))
        # kept examples before each excluded one: the k-th kept example is k plus the
        # number of exclusions whose count of kept examples before them is <= k
        self._kept_before = self.excluded - np.arange(len(self.excluded))

    def __len__(self) -> int:
        return self.size - len(self.excluded)

    def __getitem__(self, k: int) -> int:
        if not 0 <= k < len(self):
            raise IndexError(f"example {k} of a set of {len(self)}")
        if not len(self.excluded):
            return k
        return k + int(np.searchsorted(self._kept_before, k, side="right"))

    def __iter__(self):
        return (self[k] for k in range(len(self)))


@dataclass
class StreamDataset:
    """A tokenized data set as the loader uses it: its examples after `data.overlong`."""

    name: str
    data: TokenizedDataset
    examples: ExampleSet | np.ndarray  # the example ids to draw (training) or to evaluate (held out)
    seq_len: int
    splittable: bool  # text documents longer than a row are split into chunks
    class_of_label: np.ndarray | None = None  # classification: class id of each of data.label_values

    def length(self, example: int) -> int:
        """Tokens of an example after truncation (split documents keep them all; a pair is cut
        as `pair_lengths` cuts it)."""
        length = self.data.length(example)
        if self.data.pair_splits is not None:
            return sum(self._pair(example, length))
        return length if self.splittable else min(length, self.seq_len)

    def _pair(self, example: int, length: int) -> tuple[int, int]:
        first = int(self.data.pair_splits[example])
        return pair_lengths(first, length - first, self.seq_len)

    def documents(self, piece: Piece) -> list[tuple[int, int]]:
        """(first token within the example, length) of each document of a piece: a pair is its two
        sequences, chosen then rejected, each isolated in the row like any document; any other
        piece is one document."""
        if self.data.pair_splits is None:
            return [(piece.start, piece.length)]
        chosen, rejected = self._pair(piece.example, self.data.length(piece.example))
        return [(0, chosen), (int(self.data.pair_splits[piece.example]), rejected)]

    def pieces(self, index: int, example: int, length: int | None = None) -> list[Piece]:
        """The example as pieces of at most a row; `length` when the caller has it already."""
        length = self.length(example) if length is None else length
        return split_example(index, example, length, self.seq_len, self.splittable)

    def class_id(self, example: int) -> int:
        return int(self.class_of_label[self.data.label_index[example]])


class GlobalStream:
    """Rows (lists of pieces) of the run's data, in the same order on every rank."""

    def __init__(self, datasets: list[StreamDataset], weights: list[float], mix_by: str, seq_len: int,
                 packing: bool, seed: int, buffer_size: int = PACK_BUFFER):
        self._args = (datasets, weights, mix_by, seq_len, packing, seed, buffer_size)
        self.datasets = datasets
        self.seq_len = seq_len
        self.packing = packing
        self.schedule = MixingSchedule(weights, mix_by)
        self.orders = [DatasetOrder(ds.examples, seed, ds.name) for ds in datasets]
        self.primary = primary_index(weights)
        self.capacity = buffer_size if packing else 1
        self.packer = RowPacker(seq_len, PACK_MAX_WAIT)
        self.queue: collections.deque[Piece] = collections.deque()  # unpacked rows, in order
        self.draining = False  # the primary epoch ended: empty the buffer before the next
        self.rows = 0
        self.epochs_drained = 0

    def _buffered(self) -> int:
        return len(self.packer) if self.packing else len(self.queue)

    def _fill(self, new_epoch: bool = False) -> None:
        """Draw examples until the buffer is full, or the primary epoch ends. With `new_epoch`
        (the buffer was just drained) the first draw, which is of the primary data set since
        the schedule has not moved, starts its next epoch."""
        while not self.draining and self._buffered() < self.capacity:
            index = self.schedule.peek()
            order = self.orders[index]
            if index == self.primary and order.at_epoch_end() and not new_epoch:
                self.draining = True
                return
            new_epoch = False
            example = order.next()
            dataset = self.datasets[index]
            length = dataset.length(example)
            self.schedule.take(index, length)
            for piece in dataset.pieces(index, example, length):
                self.packer.add(piece) if self.packing else self.queue.append(piece)

    def next_row(self) -> list[Piece]:
        self._fill()
        if self._buffered() == 0:  # drained at the end of a primary epoch
            self.draining = False
            self.epochs_drained += 1
            self._fill(new_epoch=True)
        self.rows += 1
        return self.packer.next_row() if self.packing else [self.queue.popleft()]

    def epoch_rows(self, cache_dir: Path | None = None) -> int:
        """Rows of one pass over the primary data set, counted on a fresh copy of the stream.
        Counting means running the stream through an epoch, a minute at millions of
        examples, so the count is kept under `cache_dir/epochs/` for the next launch (and a
        resume) of the same stream; `finetrain prepare` counts it ahead."""
        key = self._fingerprint()
        file = cache_dir / "epochs" / f"{key}.json" if cache_dir is not None and key else None
        if file is not None and file.is_file():
            return json.loads(file.read_text())["rows"]
        probe = GlobalStream(*self._args)
        rows = 0
        while not probe.epochs_drained:
            rows = probe.rows
            probe.next_row()
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            fd, aside = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"rows": rows}, f)
            os.replace(aside, file)
        return rows

    def _fingerprint(self) -> str | None:
        """Everything that decides the stream's rows; None when a data set is not a cached one."""
        if any(ds.data.folder is None or not isinstance(ds.examples, ExampleSet) for ds in self.datasets):
            return None
        datasets, weights, mix_by, seq_len, packing, seed, buffer_size = self._args
        digest = hashlib.sha256(json.dumps([STREAM_VERSION, weights, mix_by, seq_len, packing, seed, buffer_size,
                                            PACK_MAX_WAIT]).encode())
        for ds in datasets:
            digest.update(json.dumps([ds.name, ds.data.folder.name, ds.seq_len, ds.splittable, ds.examples.size]).encode())
            digest.update(ds.examples.excluded.tobytes())
        return digest.hexdigest()

    @property
    def epochs(self) -> dict[str, float]:
        """Epochs of each data set drawn so far (fractional)."""
        return {ds.name: order.epoch + order.cursor / len(order) for ds, order in zip(self.datasets, self.orders)}

    def state_dict(self) -> dict:
        return {
            "schedule": self.schedule.state_dict(),
            "orders": {ds.name: order.state_dict() for ds, order in zip(self.datasets, self.orders)},
            "packer": self.packer.state_dict(),
            "queue": [tuple(p) for p in self.queue],
            "draining": self.draining,
            "rows": self.rows,
            "epochs_drained": self.epochs_drained,
            "packing": self.packing,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("packing", "seq_len"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"data.{key}: the checkpoint was written with {state[key]}, the config has "
                                 f"{getattr(self, key)}; the data stream cannot continue across that change")
        if {ds.name for ds in self.datasets} != set(state["orders"]):
            raise ConfigError(f"data.datasets: the checkpoint's data sets {sorted(state['orders'])} differ from "
                             f"the config's {[ds.name for ds in self.datasets]}")
        self.schedule.load_state_dict(state["schedule"])
        for ds, order in zip(self.datasets, self.orders):
            order.load_state_dict(state["orders"][ds.name])
        self.packer.load_state_dict(state["packer"])
        self.queue = collections.deque(Piece(*p) for p in state["queue"])
        self.draining, self.rows, self.epochs_drained = state["draining"], state["rows"], state["epochs_drained"]
