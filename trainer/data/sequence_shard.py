"""One sequence rank's part of a collated micro-batch (`parallel.sequence_parallel: N`).

Every rank of a sequence group collates the same rows; `sequence_shard` then keeps the rank's
1/N of their tokens. The rows are flattened into one stream (the layout varlen attention
takes) and cut into N equal, contiguous spans, so a document may begin on one rank and end
on the next. What a rank needs of the rest travels with its span:

- `cu_seq_lens_q/k` and `max_length_q/k` of the whole stream: after the all-to-all in
  attention (trainer/model/sequence_parallel.py) every document attends to itself and nothing else;
- its tokens' own `position_ids`, so rotary embeddings are applied where the tokens are;
- labels shifted BEFORE the cut (`labels[t]` is the target of position t): the last token of
  a span predicts the first token of the next span, which no single rank could do after the
  cut, and a document's first token is never the target of the token before it (the collator
  marks it no target, and the shift masks the position before every boundary as well).

Each token's target is counted on the one rank that holds it, so the target counts of a
group add up to the micro-batch's (invariant 2); the data counters (examples, tokens) are
kept on the group's first rank only, for the same reason. A stream whose length N does not
divide (a layout without padding) is padded with one more document that has no targets.
"""

from __future__ import annotations

import dataclasses

import torch

from trainer.data.collate import Batch
from trainer.model.loss import IGNORE_INDEX


def document_starts(inputs: dict) -> list[int]:
    """Where each document of the flattened micro-batch starts: from `cu_seq_lens_q` when the
    collator wrote them, else where `position_ids` restart (every packed document, and every
    row, starts over at 0) and where a padding mask turns on or off."""
    if "cu_seq_lens_q" in inputs:
        return inputs["cu_seq_lens_q"].tolist()[:-1]
    positions = inputs["position_ids"].reshape(-1)
    restart = positions[1:] != positions[:-1] + 1
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:  # padded rows: the padding is a document of its own
        mask = mask.reshape(-1)
        restart |= mask[1:] != mask[:-1]
    return [0, *(torch.nonzero(restart).reshape(-1) + 1).tolist()]


def sequence_shard(batch: Batch, rank: int, size: int, pad_token_id: int = 0) -> Batch:
    """Rank `rank` of a sequence group of `size`: its contiguous 1/size of the micro-batch's
    tokens, with the whole micro-batch's document bounds and labels shifted before the cut."""
    inputs = batch.inputs
    if "position_ids" not in inputs:
        raise ValueError("sequence_shard: the micro-batch has no position_ids to place its tokens with")
    ids = inputs["input_ids"].reshape(-1)
    positions = inputs["position_ids"].reshape(-1)
    labels = batch.labels.reshape(-1)
    starts = document_starts(inputs)
    pad = -ids.numel() % size
    if pad:  # one more document, without targets, so that the stream splits evenly
        starts.append(ids.numel())
        ids = torch.cat([ids, ids.new_full((pad,), pad_token_id)])
        positions = torch.cat([positions, torch.arange(pad, dtype=positions.dtype)])
        labels = torch.cat([labels, labels.new_full((pad,), IGNORE_INDEX)])
    total = ids.numel()
    bounds = torch.tensor([*starts, total], dtype=torch.int32)
    targets = torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])  # targets[t] = labels[t + 1]
    targets[bounds[1:-1].long() - 1] = IGNORE_INDEX  # the last token of a document predicts nothing
    span = slice(rank * total // size, (rank + 1) * total // size)
    longest = int((bounds[1:] - bounds[:-1]).max())
    mine = targets[span].clone()
    first = rank == 0
    return dataclasses.replace(
        batch,
        inputs={"input_ids": ids[span].clone()[None], "position_ids": positions[span].clone()[None],
                "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest,
                "use_cache": False},
        labels=mine[None],
        labels_shifted=True,
        num_targets=int((mine != IGNORE_INDEX).sum()),
        num_tokens=batch.num_tokens if first else 0,
        num_slots=batch.num_slots if first else 0,
        examples=batch.examples if first else dict.fromkeys(batch.examples, 0),
        tokens=batch.tokens if first else dict.fromkeys(batch.tokens, 0),
    )
