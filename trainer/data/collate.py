"""Rows of pieces -> the tensors of one micro-batch (`Batch`), for each attention backend.

Labels are unshifted (Hugging Face convention; `trainer.loss` shifts): -100 marks what
is not a target, i.e. padding, prompt tokens (unless `data.train_on_prompt`) and the
first token of every piece, which no earlier token of its row may predict.

Packed rows isolate their documents on every backend:
- sdpa: a 4D boolean block-diagonal causal mask [B, 1, T, T] (True = attend);
- eager: the same mask as an additive float mask (0 or the dtype's minimum);
- flash_attention_2 and varlen_reference: the rows flattened to [1, B*T] with
  `cu_seq_lens_q/k` (int32) and `max_length_q/k`, since flash attention reads document
  boundaries from `position_ids` only for a batch of one row.
The padding at the end of a packed row is a document of its own (positions from 0,
no targets), so it needs no special case in any mask and `cu_seq_lens` cover all B*T
tokens. Transformers would also infer the block mask from restarting `position_ids`
on sdpa and eager, but only when no KV cache is built; the explicit mask does not
depend on that, and `use_cache=False` is passed as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.attention import VARLEN_ATTENTION
from trainer.data.packing import Piece
from trainer.data.stream import StreamDataset
from trainer.loss import IGNORE_INDEX, count_targets



@dataclass
class Batch:
    inputs: dict  # keyword arguments of model(**inputs)
    labels: torch.Tensor  # causal: like input_ids, unshifted, -100 = no target; classification: [B] class ids
    num_targets: int  # trainer.loss.count_targets(labels, task)
    num_tokens: int  # real (non-padding) tokens
    num_slots: int  # rows x row length: the tokens computed on
    examples: dict[str, int]  # per data set: examples starting in this micro-batch
    tokens: dict[str, int]  # per data set: real tokens in this micro-batch
    row_lengths: list[list[int]] = field(default_factory=list)  # per row, its documents' lengths in order
    labels_shifted: bool = False  # labels[t] is the target of position t (a sequence shard), not of t - 1


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

    def __call__(self, rows: list[list[Piece]]) -> Batch:
        if self.task == "sequence_classification":
            return self._classification(rows)
        return self._packed(rows) if self.packing else self._padded(rows)

    def _piece(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64: stored ids may be uint16, where -100 would wrap) and target flags."""
        data = self.datasets[piece.dataset].data
        begin = int(data.offsets[piece.example]) + piece.start
        tokens = data.tokens[begin: begin + piece.length].astype(np.int64)
        return tokens, data.targets[begin: begin + piece.length]

    def _counts(self, rows: list[list[Piece]]) -> tuple[dict, dict]:
        examples = {ds.name: 0 for ds in self.datasets}
        tokens = dict(examples)
        for row in rows:
            for piece in row:
                name = self.datasets[piece.dataset].name
                examples[name] += int(piece.first)
                tokens[name] += piece.length
        return examples, tokens

    def _fill(self, rows: list[list[Piece]], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """input_ids, labels, position_ids [B, length] and each row's document lengths (the
        padding tail, where there is one, is its own document with positions from 0)."""
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((len(rows), length), dtype=np.int64)
        segments = []
        for b, row in enumerate(rows):
            at = 0
            for piece in row:
                ids, targets = self._piece(piece)
                end = at + piece.length
                input_ids[b, at:end] = ids
                if len(targets):  # causal formats
                    labels[b, at:end] = np.where(targets, ids, IGNORE_INDEX)
                    labels[b, at] = IGNORE_INDEX  # a document's first token is nobody's target
                positions[b, at:end] = np.arange(piece.length)
                at = end
            positions[b, at:] = np.arange(length - at)
            segments.append([p.length for p in row] + ([length - at] if at < length else []))
        return torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(positions), segments

    def _packed(self, rows: list[list[Piece]]) -> Batch:
        input_ids, labels, positions, segments = self._fill(rows, self.seq_len)
        if self.attention in VARLEN_ATTENTION:
            lengths = [n for row in segments for n in row]
            cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
            inputs = {"input_ids": input_ids.reshape(1, -1), "position_ids": positions.reshape(1, -1),
                      "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                      "max_length_q": max(lengths), "max_length_k": max(lengths)}
            labels = labels.reshape(1, -1)
        else:
            inputs = {"input_ids": input_ids, "position_ids": positions,
                      "attention_mask": self._block_causal_mask(segments)}
        inputs["use_cache"] = False
        return self._batch(rows, inputs, labels)

    def _block_causal_mask(self, segments: list[list[int]]) -> torch.Tensor:
        ids = torch.from_numpy(np.stack([np.repeat(np.arange(len(row)), row) for row in segments]))
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = (ids[:, :, None] == ids[:, None, :]) & causal
        allowed = allowed[:, None]
        if self.attention == "sdpa":
            return allowed
        additive = torch.zeros(allowed.shape, dtype=self.mask_dtype)
        return additive.masked_fill_(~allowed, torch.finfo(self.mask_dtype).min)

    def _padded(self, rows: list[list[Piece]]) -> Batch:
        longest = max(sum(p.length for p in row) for row in rows)
        input_ids, labels, positions, segments = self._fill(rows, longest)
        real = torch.tensor([[1] * sum(p.length for p in row) + [0] * (longest - sum(p.length for p in row))
                             for row in rows], dtype=torch.int64)
        inputs = {"input_ids": input_ids, "attention_mask": real, "use_cache": False}
        if self.position_ids:
            inputs["position_ids"] = torch.arange(longest).expand(len(rows), -1).clone()
        return self._batch(rows, inputs, labels)

    def _classification(self, rows: list[list[Piece]]) -> Batch:
        longest = max(sum(p.length for p in row) for row in rows)
        input_ids, _, _, _ = self._fill(rows, longest)
        real = torch.tensor([[1] * row[0].length + [0] * (longest - row[0].length) for row in rows], dtype=torch.int64)
        labels = torch.tensor([self.datasets[row[0].dataset].class_id(row[0].example) for row in rows],
                              dtype=torch.int64)
        return self._batch(rows, {"input_ids": input_ids, "attention_mask": real}, labels)

    def _batch(self, rows: list[list[Piece]], inputs: dict, labels: torch.Tensor) -> Batch:
        examples, tokens = self._counts(rows)
        row_length = self.seq_len if self.packing else int(inputs["input_ids"].numel() // len(rows))
        return Batch(
            inputs=inputs,
            labels=labels,
            num_targets=count_targets(labels, self.task),
            num_tokens=sum(tokens.values()),
            num_slots=len(rows) * row_length,
            examples=examples,
            tokens=tokens,
            row_lengths=[[p.length for p in row] for row in rows],
        )


def describe_batch(batch: Batch, tokenizer) -> str:
    """The layout of a micro-batch: rows, their documents, lengths and target spans.
    Target text is shown between ⟦ and ⟧; everything else is masked from the loss."""
    rows = len(batch.row_lengths)
    input_ids = batch.inputs["input_ids"].reshape(rows, -1)
    width = input_ids.shape[1]
    flat = " (flattened to 1 row for varlen attention)" if "cu_seq_lens_q" in batch.inputs else ""
    lines = [f"micro-batch: {rows} rows x {width} tokens{flat}; {batch.num_tokens} real tokens "
             f"({100 * batch.num_tokens / max(batch.num_slots, 1):.1f}% of slots), {batch.num_targets} targets"]
    classification = batch.labels.dim() == 1
    labels = None if classification else batch.labels.reshape(rows, -1)
    for r, lengths in enumerate(batch.row_lengths):
        padding = width - sum(lengths)
        lines.append(f"row {r}: {len(lengths)} document(s) {lengths}, padding {padding}")
        at = 0
        for k, n in enumerate(lengths):
            ids = input_ids[r, at: at + n].tolist()
            if classification:
                lines.append(f"  doc {k} [{at}:{at + n}] label {int(batch.labels[r])}: {_clip(tokenizer.decode(ids))!r}")
            else:
                mask = (labels[r, at: at + n] != IGNORE_INDEX).tolist()
                lines.append(f"  doc {k} [{at}:{at + n}] {sum(mask)} targets: {_clip(_mark_targets(tokenizer, ids, mask))}")
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
