"""Rows of pieces -> the tensors of one micro-batch (`Batch`), for each attention backend.

Labels are unshifted (Hugging Face convention; `trainer.model.loss` shifts): -100 marks what
is not a target, i.e. padding, prompt tokens (unless `data.train_on_prompt`) and the
first token of every piece, which no earlier token of its row may predict.

Packed micro-batches are pad-free: they compute their real tokens, plus at most a small
rounding. How, depends on what the backend takes:

- varlen backends (flash_attention_2, torch_varlen, sdpa_varlen, varlen_reference), and every
  backend under sequence parallelism: the micro-batch's rows are flattened (`_flat`) into ONE
  token stream [1, N], every piece one after the other, with N the real tokens rounded up to a
  multiple of `flat_multiple` (FLAT_MULTIPLE; with sequence parallelism also of the group's
  size N, so that `sequence_shard` cuts it into equal spans). Each piece is a sequence of
  `cu_seq_lens_q/k` (int32, from 0 to N) with `max_length_q/k`, since flash attention reads
  document boundaries from `position_ids` only for a batch of one row;
- sdpa and eager (`_masked`): rows [B, T] with T the longest row rounded up to a multiple of
  ROW_MULTIPLE (at most `data.seq_len`), so torch.compile sees few shapes, and a block-diagonal
  causal mask [B, 1, T, T]: boolean (True = attend) on sdpa, additive (0 or the dtype's minimum)
  on eager.

Both are built by `_fill(rows, width)`, which lays documents out left to right in rows of `width`
tokens: position ids restart at 0 with every document, and the padding at the end of a row (if
any) is a document of its own (positions from 0, no targets), so it needs no special case in
any mask and `cu_seq_lens` cover every position. `_documents` gives each row's sequence lengths,
from which the mask or `cu_seq_lens` are built. A piece is one document, except a preference
pair: its chosen and its rejected sequence are two (trainer/data/preference_rows.py), side by side in
a packed row, or each in a padded row of its own when rows are not packed; `Batch.preference`
says which tokens belong to which sequence. Transformers would also infer the block mask
from restarting `position_ids` on sdpa and eager, but only when no KV cache is built; the
explicit mask does not depend on that, and `use_cache=False` is passed as well.

`Batch.num_slots` counts the positions computed (what `padding_tokens` in the metrics is
taken from), `Batch.capacity` the rows' budget (rows x `data.seq_len`), so that real tokens
over capacity is the packer's fill rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from trainer.config.schema import Config
from trainer.data.packing import Piece
from trainer.data.preference_rows import PREFERENCE_FORMATS, PreferenceSequences
from trainer.data.stream import StreamDataset
from trainer.model.attention import NAME as VARLEN_REFERENCE, VARLEN_ATTENTION
from trainer.model.loss import IGNORE_INDEX, count_targets
from trainer.peft.methods import prepends_virtual_tokens

# Rounding of a packed micro-batch's length: rows of the masked layout to a multiple of 64 (at
# most seq_len/64 shapes for torch.compile), a flattened stream to a multiple of 8 (aligned for
# the kernels; its length varies per micro-batch anyway, which compiles to one dynamic shape).
ROW_MULTIPLE = 64
FLAT_MULTIPLE = 8


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Batch:
    inputs: dict  # keyword arguments of model(**inputs)
    labels: torch.Tensor  # causal: like input_ids, unshifted, -100 = no target; classification: [B] class ids
    num_targets: int  # trainer.model.loss.count_targets(labels, task)
    num_tokens: int  # real (non-padding) tokens
    num_slots: int  # positions computed on: real tokens + padding
    examples: dict[str, int]  # per data set: examples starting in this micro-batch
    tokens: dict[str, int]  # per data set: real tokens in this micro-batch
    row_lengths: list[list[int]] = field(default_factory=list)  # per row, its documents' lengths in order
    labels_shifted: bool = False  # labels[t] is the target of position t (a sequence shard), not of t - 1
    row_starts: list[int] = field(default_factory=list)  # per row, its first position in the flattened inputs
    capacity: int = 0  # rows x data.seq_len: what the rows could hold
    preference: PreferenceSequences | None = None  # the preference sequences, where the rows hold any

    def pin_memory(self) -> "Batch":
        """The tensors in page-locked host memory, for asynchronous copies to a GPU."""
        self.inputs = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        self.labels = self.labels.pin_memory()
        if self.preference is not None:
            self.preference.token_sequence = self.preference.token_sequence.pin_memory()
        return self

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        self.inputs = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                       for k, v in self.inputs.items()}
        self.labels = self.labels.to(device, non_blocking=non_blocking)
        if self.preference is not None:
            self.preference.token_sequence = self.preference.token_sequence.to(device, non_blocking=non_blocking)
        return self

    def tensors(self) -> list[torch.Tensor]:
        extra = [self.preference.token_sequence] if self.preference is not None else []
        return [self.labels, *(v for v in self.inputs.values() if torch.is_tensor(v)), *extra]


class _Document(NamedTuple):
    """One document of a row: a piece, or one sequence of a preference pair."""

    piece: Piece
    part: int  # which sequence of its example (a pair: 0 chosen, 1 rejected)
    start: int  # first token within the example
    length: int


@dataclass
class Collator:
    """Builds micro-batches from rows; one instance per (data sets, task, attention)."""

    datasets: list[StreamDataset]
    task: str
    seq_len: int
    packing: bool
    attention: str
    pad_token_id: int
    mask_dtype: torch.dtype = torch.float32  # of the eager backend's additive mask
    position_ids: bool = True  # false for prompt tuning, which prepends tokens without positions
    flat_multiple: int = FLAT_MULTIPLE  # a flattened stream's length rounds up to this (sequence parallelism: N divides it)

    def __call__(self, rows: list[list[Piece]]) -> Batch:
        if self.task == "sequence_classification":
            return self._classification(rows)
        if not self.packing:
            return self._padded(rows)
        return self._flat(rows) if self.attention in VARLEN_ATTENTION else self._masked(rows)

    def _documents_of(self, row: list[Piece]) -> list[_Document]:
        return [_Document(piece, part, start, length) for piece in row
                for part, (start, length) in enumerate(self.datasets[piece.dataset].documents(piece))]

    def _tokens(self, document: _Document) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64: stored ids may be uint16, where -100 would wrap) and target flags."""
        data = self.datasets[document.piece.dataset].data
        begin = int(data.offsets[document.piece.example]) + document.start
        tokens = data.tokens[begin: begin + document.length].astype(np.int64)
        return tokens, data.targets[begin: begin + document.length]

    def _counts(self, rows: list[list[Piece]]) -> tuple[dict, dict]:
        examples = {ds.name: 0 for ds in self.datasets}
        tokens = dict(examples)
        for row in rows:
            for piece in row:
                name = self.datasets[piece.dataset].name
                examples[name] += int(piece.first)
                tokens[name] += piece.length
        return examples, tokens

    def _fill(self, rows: list[list[_Document]], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       PreferenceSequences | None]:
        """input_ids, labels and position_ids [len(rows), width]: each row's documents left to right,
        positions from 0 in each document and in the padding tail; and the preference sequences
        among the documents (None: there are none)."""
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        sequences = _SequenceTable(self.datasets, (len(rows), width))
        for b, row in enumerate(rows):
            at = 0
            for document in row:
                ids, targets = self._tokens(document)
                end = at + document.length
                input_ids[b, at:end] = ids
                if len(targets):  # causal formats
                    labels[b, at:end] = np.where(targets, ids, IGNORE_INDEX)
                    labels[b, at] = IGNORE_INDEX  # a document's first token is nobody's target
                positions[b, at:end] = np.arange(document.length)
                sequences.add(document, b, at, end)
                at = end
            positions[b, at:] = np.arange(width - at)
        return torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(positions), sequences.result()

    @staticmethod
    def _documents(row: list[_Document], width: int) -> list[int]:
        """The sequence lengths of a row of `width` positions: its documents, then the padding tail."""
        used = sum(d.length for d in row)
        return [d.length for d in row] + ([width - used] if used < width else [])

    def _flat(self, rows: list[list[Piece]]) -> Batch:
        """Varlen backends: all rows as one stream [1, N] with cu_seq_lens over its documents."""
        stream = [document for row in rows for document in self._documents_of(row)]
        width = round_up(sum(d.length for d in stream), self.flat_multiple)
        input_ids, labels, positions, preference = self._fill([stream], width)
        lengths = self._documents(stream, width)
        cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        inputs = {"input_ids": input_ids, "position_ids": positions, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                  "max_length_q": max(lengths), "max_length_k": max(lengths), "use_cache": False}
        starts = np.concatenate([[0], np.cumsum([sum(p.length for p in row) for row in rows])[:-1]])
        return self._batch(rows, inputs, labels, [int(s) for s in starts], preference)

    def _masked(self, rows: list[list[Piece]]) -> Batch:
        """sdpa and eager: rows [B, T] as long as the longest (rounded), a block-diagonal mask."""
        documents = [self._documents_of(row) for row in rows]
        longest = max(sum(p.length for p in row) for row in rows)
        width = min(round_up(longest, ROW_MULTIPLE), max(self.seq_len, longest))
        input_ids, labels, positions, preference = self._fill(documents, width)
        inputs = {"input_ids": input_ids, "position_ids": positions,
                  "attention_mask": self._block_causal_mask([self._documents(row, width) for row in documents]),
                  "use_cache": False}
        return self._batch(rows, inputs, labels, [b * width for b in range(len(rows))], preference)

    def _block_causal_mask(self, documents: list[list[int]]) -> torch.Tensor:
        ids = torch.from_numpy(np.stack([np.repeat(np.arange(len(row)), row) for row in documents]))
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = (ids[:, :, None] == ids[:, None, :]) & causal
        allowed = allowed[:, None]
        if self.attention == "sdpa":
            return allowed
        additive = torch.zeros(allowed.shape, dtype=self.mask_dtype)
        return additive.masked_fill_(~allowed, torch.finfo(self.mask_dtype).min)

    def _padded(self, rows: list[list[Piece]]) -> Batch:
        """One document per row, right-padded to the longest (a pair's two sequences: two rows)."""
        documents = [[document] for row in rows for document in self._documents_of(row)]
        longest = max(row[0].length for row in documents)
        input_ids, labels, _, preference = self._fill(documents, longest)
        real = torch.tensor([[1] * row[0].length + [0] * (longest - row[0].length) for row in documents],
                            dtype=torch.int64)
        inputs = {"input_ids": input_ids, "attention_mask": real, "use_cache": False}
        if self.position_ids:
            inputs["position_ids"] = torch.arange(longest).expand(len(documents), -1).clone()
        return self._batch(rows, inputs, labels, [b * longest for b in range(len(documents))], preference, documents)

    def _classification(self, rows: list[list[Piece]]) -> Batch:
        longest = max(sum(p.length for p in row) for row in rows)
        input_ids, _, _, _ = self._fill([self._documents_of(row) for row in rows], longest)
        real = torch.tensor([[1] * row[0].length + [0] * (longest - row[0].length) for row in rows], dtype=torch.int64)
        labels = torch.tensor([self.datasets[row[0].dataset].class_id(row[0].example) for row in rows],
                              dtype=torch.int64)
        return self._batch(rows, {"input_ids": input_ids, "attention_mask": real}, labels,
                           [b * longest for b in range(len(rows))])

    def _batch(self, rows: list[list[Piece]], inputs: dict, labels: torch.Tensor, row_starts: list[int],
               preference: PreferenceSequences | None = None, documents: list[list[_Document]] | None = None) -> Batch:
        """`documents`: the documents of each row of `inputs` (default: those of `rows`)."""
        examples, tokens = self._counts(rows)
        documents = documents if documents is not None else [self._documents_of(row) for row in rows]
        return Batch(
            inputs=inputs,
            labels=labels,
            num_targets=count_targets(labels, self.task),
            num_tokens=sum(tokens.values()),
            num_slots=int(inputs["input_ids"].numel()),
            examples=examples,
            tokens=tokens,
            row_lengths=[[d.length for d in row] for row in documents],
            row_starts=row_starts,
            capacity=len(rows) * self.seq_len,
            preference=preference,
        )


class _SequenceTable:
    """The preference sequences among a micro-batch's documents, as `_fill` lays them out."""

    def __init__(self, datasets: list[StreamDataset], shape: tuple[int, int]):
        self.datasets = datasets
        self.token_sequence = np.full(shape, -1, dtype=np.int64)
        self.pair, self.chosen, self.margin, self.keys = [], [], [], []
        self.pairs = 0

    def add(self, document: _Document, row: int, begin: int, end: int) -> None:
        dataset = self.datasets[document.piece.dataset]
        data, example = dataset.data, document.piece.example
        if data.format not in PREFERENCE_FORMATS:
            return
        self.token_sequence[row, begin:end] = len(self.keys)
        self.keys.append((dataset.name, example, document.part))
        if data.pair_splits is not None:  # chosen (part 0), then rejected (part 1)
            self.pair.append(self.pairs)
            self.pairs += document.part
            self.chosen.append(document.part == 0)
            self.margin.append(float(data.margins[example]))
        else:
            self.pair.append(-1)
            self.chosen.append(bool(data.label(example)))
            self.margin.append(0.0)

    def result(self) -> PreferenceSequences | None:
        if not self.keys:
            return None
        return PreferenceSequences(torch.from_numpy(self.token_sequence), torch.tensor(self.pair, dtype=torch.int64),
                                   torch.tensor(self.chosen, dtype=torch.bool),
                                   torch.tensor(self.margin, dtype=torch.float32), self.keys)


def describe_batch(batch: Batch, tokenizer) -> str:
    """The layout of a micro-batch: rows, their documents, lengths and target spans, how full
    the packer filled the rows, and what share of the computed positions is real.
    Target text is shown between ⟦ and ⟧; everything else is masked from the loss."""
    rows = len(batch.row_lengths)
    input_ids = batch.inputs["input_ids"]
    ids, labels = input_ids.reshape(-1).tolist(), None
    classification = batch.labels.dim() == 1
    if not classification:
        labels = batch.labels.reshape(-1).tolist()
    shape = "x".join(str(n) for n in input_ids.shape)
    layout = " (the rows flattened into one stream for varlen attention)" if "cu_seq_lens_q" in batch.inputs else ""
    lines = [f"micro-batch: {rows} rows as input_ids {shape}{layout}; {batch.num_tokens} real tokens, "
             f"{batch.num_slots - batch.num_tokens} padding ({100 * batch.num_tokens / max(batch.num_slots, 1):.1f}% "
             f"of computed positions real), rows filled to {100 * batch.num_tokens / max(batch.capacity, 1):.1f}% "
             f"of data.seq_len, {batch.num_targets} targets"]
    for r, (lengths, start) in enumerate(zip(batch.row_lengths, batch.row_starts)):
        lines.append(f"row {r}: {len(lengths)} document(s) {lengths}, {sum(lengths)} tokens")
        at = start
        for k, n in enumerate(lengths):
            doc = ids[at: at + n]
            span = f"[{at - start}:{at - start + n}]"
            if classification:
                lines.append(f"  doc {k} {span} label {int(batch.labels[r])}: {_clip(tokenizer.decode(doc))!r}")
            else:
                mask = [label != IGNORE_INDEX for label in labels[at: at + n]]
                lines.append(f"  doc {k} {span} {sum(mask)} targets: {_clip(_mark_targets(tokenizer, doc, mask))}")
            at += n
    return "\n".join(lines)


def _mark_targets(tokenizer, ids: list[int], mask: list[bool]) -> str:
    text, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            span = tokenizer.decode(ids[start:i])
            text.append(f"⟦{span}⟧" if mask[start] else span)
            start = i
    return repr("".join(text))[1:-1]


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 20] + " ... " + text[-15:]


def build_collator(cfg: Config, datasets: list[StreamDataset], tokenizer, attention: str) -> Collator:
    # Sequence-parallel attention reads every backend's document bounds from cu_seq_lens: rows are
    # collated flattened, as for varlen attention, to a length that splits evenly over the group's
    # ranks (no filler document for the shard to add), and no seq_len^2 mask is built to be dropped.
    size = cfg.parallel.sequence_parallel
    layout = attention if size == 1 else VARLEN_REFERENCE
    return Collator(datasets, cfg.model.task, cfg.data.seq_len, cfg.data.packing, layout, tokenizer.pad_token_id,
                    mask_dtype=getattr(torch, cfg.model.dtype), flat_multiple=math.lcm(FLAT_MULTIPLE, size),
                    position_ids=not prepends_virtual_tokens(cfg.peft.method))
