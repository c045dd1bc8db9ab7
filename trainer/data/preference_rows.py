"""Preference data: pairs (`preference`) and unpaired judgements (`unpaired_preference`) to token ids,
and how a pair lies in a row.

- preference: `prompt`, `chosen` and `rejected`, each a string or a list of chat messages. A string
  prompt is one user turn, a string answer one assistant turn; message lists are read as chat data
  is (role, content, tool calls, reasoning). Without a prompt, the prompt is the leading turns that
  `chosen` and `rejected` share (Anthropic's HH layout); an answer that repeats the prompt's turns
  first (UltraFeedback's layout) is read without them. `margin`, optional: the Bradley-Terry margin
  of a reward model.
- unpaired_preference: `prompt`, `completion` and `label` (true: desirable), for KTO.

Each sequence, prompt then answer, is rendered through the tokenizer's chat template like a chat
row; its targets are the answer's assistant turns only (the prompt's own assistant turns, in a
multi-turn prompt, are context). A pair is ONE example whose tokens are the chosen sequence then
the rejected one (`Encoded.sequences` holds their lengths): the packer places it whole in one row,
so the two members of a pair are always in the same micro-batch and on the same rank, and the
collator lays the two out as two documents, each isolated like any packed document.

A pair longer than `data.seq_len` is cut (`data.overlong: truncate`) by `pair_lengths`: each
sequence keeps its first L tokens, L the largest that lets both fit, so a short answer leaves its
room to a long one; a pair cut to a sequence without targets is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.data.chat import ChatEncoder, Conversation
from trainer.data.records import DEFAULT_FIELDS, TRAIN_ON_DEFAULT, Encoded, RowError, get_field, short_repr

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAIRED, UNPAIRED = "preference", "unpaired_preference"
PREFERENCE_FORMATS = (PAIRED, UNPAIRED)


class _Answers:
    """Prompts and answers of a preference record as chat turns, encoded through the chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on: tuple):
        # The turns inside prompt/chosen/rejected lists are read as a chat data set's, with its role
        # and content names renamed as this data set's `fields` rename them.
        chat_names = {**DEFAULT_FIELDS["chat"], "role": names["role"], "content": names["content"]}
        self.chat = ChatEncoder(tokenizer, chat_names, train_on_prompt=False, train_on=train_on)
        self.names = names

    def turns(self, record: dict, key: str, role: str, required: bool = True) -> list[dict] | None:
        """Field `key` as chat messages: a string is one turn of `role`."""
        value = get_field(record, self.names, key, (str, list), required)
        if value is None:
            return None
        field = self.names[key]
        if isinstance(value, str):
            if not value.strip():
                raise RowError(f'empty field "{field}"')
            return [{"role": role, "content": value}]
        if not value:
            raise RowError(f'empty field "{field}": a list without turns')
        try:
            return self.chat.read_turns(value, field)
        except RowError as err:
            raise RowError(f'field "{field}": {err}') from None

    def answer(self, record: dict, key: str, prompt: list[dict]) -> list[dict]:
        """The answer's turns after the prompt (leading turns that repeat the prompt dropped)."""
        turns = self.turns(record, key, "assistant")
        if turns[:len(prompt)] == prompt and len(turns) > len(prompt):
            turns = turns[len(prompt):]
        if not any(t["role"] == "assistant" and (t["content"].strip() or t.get("tool_calls")) for t in turns):
            raise RowError(f'empty completion: field "{self.names[key]}" has no assistant answer')
        return turns

    def encode(self, prompt: list[dict], answer: list[dict]) -> Encoded:
        encoded = self.chat.encode_messages(Conversation(prompt + answer), from_turn=len(prompt))
        return Encoded(np.asarray(encoded.tokens, dtype=np.int64), np.asarray(encoded.targets, dtype=bool))


class PreferenceEncoder:
    """A pair: prompt + chosen, then prompt + rejected, one example of two sequences."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool,
                 train_on: tuple = TRAIN_ON_DEFAULT):
        self.answers = _Answers(tokenizer, names, tuple(train_on))
        self.names = names

    def prompt_and_answers(self, record: dict) -> tuple[list[dict], list[dict], list[dict]]:
        """(prompt, chosen, rejected) as chat turns."""
        answers = self.answers
        prompt = answers.turns(record, "prompt", "user", required=False)
        if prompt is None:  # the turns both answers start with
            chosen = answers.turns(record, "chosen", "assistant")
            rejected = answers.turns(record, "rejected", "assistant")
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt = chosen[:shared]
        chosen, rejected = answers.answer(record, "chosen", prompt), answers.answer(record, "rejected", prompt)
        if chosen == rejected:
            raise RowError(f'fields "{self.names["chosen"]}" and "{self.names["rejected"]}" are the same answer '
                           "(a pair must prefer one answer to another)")
        return prompt, chosen, rejected

    def encode(self, record: dict) -> Encoded:
        prompt, chosen, rejected = self.prompt_and_answers(record)
        margin = get_field(record, self.names, "margin", (int, float), required=False)
        if margin is not None and not math.isfinite(margin):
            raise RowError(f'field "{self.names["margin"]}" must be a finite number, got {short_repr(margin)}')
        first, second = self.answers.encode(prompt, chosen), self.answers.encode(prompt, rejected)
        if np.array_equal(first.tokens, second.tokens):
            raise RowError(f'fields "{self.names["chosen"]}" and "{self.names["rejected"]}" render to the same '
                           "tokens")
        return Encoded(np.concatenate([first.tokens, second.tokens]), np.concatenate([first.targets, second.targets]),
                       sequences=[len(first.tokens), len(second.tokens)], margin=float(margin or 0.0))


class UnpairedPreferenceEncoder:
    """One judged completion: prompt + completion, and whether it is desirable (KTO)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool,
                 train_on: tuple = TRAIN_ON_DEFAULT):
        self.answers = _Answers(tokenizer, names, tuple(train_on))
        self.names = names

    def encode(self, record: dict) -> Encoded:
        label = record.get(self.names["label"])
        if not isinstance(label, bool):
            shown = "missing" if label is None else f"{type(label).__name__} {short_repr(label)}"
            raise RowError(f'field "{self.names["label"]}" must be true (desirable) or false, got {shown}')
        prompt = self.answers.turns(record, "prompt", "user")
        completion = self.answers.answer(record, "completion", prompt)
        encoded = self.answers.encode(prompt, completion)
        return Encoded(encoded.tokens, encoded.targets, label=label, sequences=[len(encoded.tokens)])


def pair_lengths(first: int, second: int, seq_len: int) -> tuple[int, int]:
    """The lengths a pair of sequences keeps within `seq_len` tokens together: each its first L
    tokens, L the largest that fits (a short sequence leaves its room to the long one)."""
    if first + second <= seq_len:
        return first, second
    keep = max(seq_len // 2, seq_len - min(first, second))
    return min(first, keep), min(second, seq_len - min(first, keep))


def trains_after_cut(data, example: int, seq_len: int) -> bool:
    """Whether an over-long example (a TokenizedDataset's) keeps a target once cut to `seq_len`:
    for a pair, each of its two sequences must (a pair without one compares nothing)."""
    targets = data.example_targets(example)
    if data.pair_splits is None:
        return bool(targets[1:seq_len].any())
    split = int(data.pair_splits[example])
    chosen, rejected = pair_lengths(split, len(targets) - split, seq_len)
    return bool(targets[1:chosen].any() and targets[split + 1:split + rejected].any())


def preference_texts(record: dict, names: dict) -> list[str]:
    """The free text of a preference record (for training a tokenizer)."""
    texts = []
    for key in ("prompt", "chosen", "rejected", "completion"):
        value = record.get(names.get(key, key)) if key in names else None
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            texts += [t.get(names["content"]) for t in value
                      if isinstance(t, dict) and isinstance(t.get(names["content"]), str)]
    return texts


@dataclass
class PreferenceSequences:
    """The preference sequences of one micro-batch, in the order the collator laid them out: each
    pair's chosen sequence, then its rejected one; each unpaired completion alone. Only these
    sequences are scored; padding and every other document (rehearsal text, chat) are not."""

    token_sequence: torch.Tensor  # int64, shaped like input_ids: the sequence each token belongs to, -1 elsewhere
    pair: torch.Tensor  # [S] int64: the pair of each sequence within the micro-batch, -1 for an unpaired one
    chosen: torch.Tensor  # [S] bool: the chosen sequence of its pair, or a desirable completion
    margin: torch.Tensor  # [S] float32: its pair's margin (reward models)
    keys: list[tuple[str, int, int]]  # [S]: (data set, example, sequence within the example)

    @property
    def num_sequences(self) -> int:
        return len(self.keys)

    @property
    def num_pairs(self) -> int:
        return int((self.pair >= 0).sum()) // 2
