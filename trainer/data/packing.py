"""Packing tokenized examples into rows of `data.seq_len` tokens.

A row is a list of pieces; a piece is an example, or one chunk of a text document
longer than a row. The collator (`collate.py`) turns rows into tensors in which every
piece is its own document: position ids restart at 0, its first token is not a target,
and attention never crosses into another piece.

`RowPacker` streams: over a look-ahead buffer of pieces (bounded by its caller, the
global stream) it builds one row at a time, best-fit decreasing (the longest buffered piece opens the row, then the longest
piece that still fits is added until none does). A piece that has waited `max_wait`
rows opens the next row instead, so no piece waits forever behind longer ones and the
packed stream stays close to the mixing schedule.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple


class Piece(NamedTuple):
    dataset: int  # index into the loader's data sets
    example: int  # example index within that data set
    start: int  # first token of the piece within the example
    length: int
    first: bool  # the example starts here (an example counts once, where it starts)


def split_example(dataset: int, example: int, length: int, seq_len: int, splittable: bool) -> list[Piece]:
    """An example as pieces of at most `seq_len` tokens: text documents are cut into
    consecutive chunks, anything else is kept whole (the caller truncated it already)."""
    if not splittable or length <= seq_len:
        return [Piece(dataset, example, 0, min(length, seq_len), True)]
    return [Piece(dataset, example, start, min(seq_len, length - start), start == 0)
            for start in range(0, length, seq_len)]


class RowPacker:
    """Best-fit-decreasing rows over the pieces added so far (the caller bounds how many)."""

    def __init__(self, seq_len: int, max_wait: int):
        self.seq_len = seq_len
        self.max_wait = max_wait
        # (length, -arrival number, rows built at arrival, piece), sorted: the longest piece
        # is last, and of equally long pieces the one that arrived first.
        self._entries: list[tuple] = []
        self._arrivals = 0
        self.rows_built = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, piece: Piece) -> None:
        if not 0 < piece.length <= self.seq_len:
            raise ValueError(f"piece of {piece.length} tokens does not fit a row of {self.seq_len}")
        bisect.insort(self._entries, (piece.length, -self._arrivals, self.rows_built, Piece(*piece)))
        self._arrivals += 1

    def next_row(self) -> list[Piece]:
        """Remove and return the pieces of the next row."""
        if not self._entries:
            raise IndexError("next_row from an empty packer")
        oldest = max(range(len(self._entries)), key=lambda i: self._entries[i][1])
        starved = self.rows_built - self._entries[oldest][2] >= self.max_wait
        row = [self._entries.pop(oldest if starved else len(self._entries) - 1)[3]]
        space = self.seq_len - row[0].length
        while space > 0 and self._entries:
            fits = bisect.bisect_right(self._entries, (space, float("inf"))) - 1
            if fits < 0:
                break
            piece = self._entries.pop(fits)[3]
            row.append(piece)
            space -= piece.length
        self.rows_built += 1
        return row

    def state_dict(self) -> dict:
        return {"entries": [(length, -neg, born, tuple(piece)) for length, neg, born, piece in self._entries],
                "arrivals": self._arrivals, "rows_built": self.rows_built}

    def load_state_dict(self, state: dict) -> None:
        self._entries = [(length, -arrival, born, Piece(*piece)) for length, arrival, born, piece in state["entries"]]
        self._entries.sort()
        self._arrivals = state["arrivals"]
        self.rows_built = state["rows_built"]


def pack_pieces(pieces: list[Piece], seq_len: int) -> list[list[Piece]]:
    """All of `pieces` into rows, best-fit decreasing over the whole list (evaluation)."""
    packer = RowPacker(seq_len, max_wait=len(pieces) + 1)
    for piece in pieces:
        packer.add(piece)
    rows = []
    while len(packer):
        rows.append(packer.next_row())
    return rows
