"""Records to token ids and target masks, one encoder per data format.

- chat: `messages` [{role, content}] rendered with the tokenizer's chat template; the
  targets are the assistant turns (all tokens with `data.train_on_prompt`). A row may offer
  `tools` (function schemas); assistant turns may carry `tool_calls` and `reasoning_content`,
  `tool` turns the results. Which parts of an assistant turn train is the data set's
  `train_on` (content, reasoning, tool_calls: all by default); tool results never train.
- instruction: `prompt` (+ optional `input`, `system`) and `response`, rendered as a
  user/assistant exchange through the same chat template.
- text: the text followed by EOS; every token is a target (continued pretraining).
- classification: `text` and `label`; an integer class id, or a class name (string).
- tokenized: `input_ids` from the user's own pipeline, and optional `labels` (the ids
  again where a token is a target, -100 where not; unshifted, as in Hugging Face).
- choice (evaluation only): a `context`, its `choices` and the `answer` (see
  `choice_question`), scored by trainer/eval/multiple_choice.py.
- preference and unpaired_preference: pairs of answers to one prompt, or judged answers
  (trainer/data/preference_rows.py).

Field names are mapped per dataset (`fields: {messages: conversations, role: from,
content: value}` reads sharegpt, `{prompt: instruction, input: input, response: output}`
reads alpaca); sharegpt's role names `human` and `gpt` are read as user and assistant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trainer.data.chat import ChatEncoder
from trainer.data.preference_rows import (PREFERENCE_FORMATS, PreferenceEncoder, UnpairedPreferenceEncoder,
                                          preference_texts)
from trainer.data.records import TRAIN_ON_DEFAULT, TRAIN_PARTS, Encoded, RowError, get_field, short_repr
from trainer.model.loss import IGNORE_INDEX
from trainer.runtime.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class InstructionEncoder:
    """prompt/input/response as one user turn and one assistant turn (optional system turn)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool,
                 train_on: tuple = TRAIN_ON_DEFAULT):
        self.chat = ChatEncoder(tokenizer, names, train_on_prompt, train_on)
        self.names = names

    def messages(self, record: dict) -> list[dict]:
        prompt = get_field(record, self.names, "prompt", str)
        extra = get_field(record, self.names, "input", str, required=False)
        response = get_field(record, self.names, "response", str)
        system = get_field(record, self.names, "system", str, required=False)
        if not prompt.strip():
            raise RowError(f'empty field "{self.names["prompt"]}"')
        if not response.strip():
            raise RowError(f'empty field "{self.names["response"]}"')
        user = f"{prompt}\n\n{extra}" if extra and extra.strip() else prompt
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": response}]

    def encode(self, record: dict) -> Encoded:
        return self.chat.encode_messages(self.messages(record))


class TextEncoder:
    """A document and its EOS: packed documents are then separated by EOS."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool, train_on: tuple = ()):
        if tokenizer.eos_token_id is None:
            raise ConfigError("model.tokenizer: text data needs a tokenizer with an EOS token to end each document")
        self.tokenizer = tokenizer
        self.names = names

    def encode(self, record: dict) -> Encoded:
        text = get_field(record, self.names, "text", str)
        if not text.strip():
            raise RowError(f'empty field "{self.names["text"]}"')
        tokens = self.tokenizer(text)["input_ids"]
        if not tokens or tokens[-1] != self.tokenizer.eos_token_id:
            tokens.append(self.tokenizer.eos_token_id)
        return Encoded(tokens, [True] * len(tokens))


class ClassificationEncoder:
    """Text with the tokenizer's special tokens, and its label (int, or a class name)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool, train_on: tuple = ()):
        self.tokenizer = tokenizer
        self.names = names

    def encode(self, record: dict) -> Encoded:
        text = get_field(record, self.names, "text", str)
        label = get_field(record, self.names, "label", (int, str))
        if not text.strip():
            raise RowError(f'empty field "{self.names["text"]}"')
        if isinstance(label, str) and not label.strip():
            raise RowError(f'empty field "{self.names["label"]}"')
        return Encoded(self.tokenizer(text)["input_ids"], label=label)


class TokenizedEncoder:
    """Token ids tokenized elsewhere, checked against the run's tokenizer: every id in its
    vocabulary, `labels` (optional; without them every token is a target) as long as
    `input_ids` and each one either the id at its position or -100, and at least one target
    after the first token (which no earlier token predicts). The labels decide the targets;
    `data.train_on_prompt` does not apply. Checked with numpy (pre-tokenized corpora are
    large); the element-by-element search runs only to name what is wrong."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool, train_on: tuple = ()):
        self.vocab_size = len(tokenizer)
        self.names = names

    def encode(self, record: dict) -> Encoded:
        ids = _integers(record, self.names, "input_ids", required=True)
        if not len(ids):
            raise RowError(f'empty field "{self.names["input_ids"]}"')
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            i = int(np.flatnonzero((ids < 0) | (ids >= self.vocab_size))[0])
            raise RowError(f'{self.names["input_ids"]}[{i}] is {ids[i]}, outside the tokenizer\'s vocabulary '
                           f'[0, {self.vocab_size})')
        labels = _integers(record, self.names, "labels", required=False)
        if labels is None:
            return Encoded(ids, np.ones(len(ids), dtype=bool))
        if len(labels) != len(ids):
            raise RowError(f'field "{self.names["labels"]}" has {len(labels)} entries, '
                           f'"{self.names["input_ids"]}" has {len(ids)}')
        targets = labels == ids
        wrong = ~targets & (labels != IGNORE_INDEX)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise RowError(f'{self.names["labels"]}[{i}] is {labels[i]}: a label is the token id at its position '
                           f'({ids[i]}) or {IGNORE_INDEX}')
        if not targets[1:].any():
            raise RowError(f"no target tokens: every label after the first is {IGNORE_INDEX}")
        return Encoded(ids, targets)


def _integers(record: dict, names: dict, key: str, required: bool) -> np.ndarray | None:
    """A field that must be a list of integers (not booleans), as an int64 array."""
    values = get_field(record, names, key, list, required)
    if values is None:
        return None
    if not set(map(type, values)) <= {int}:
        i, value = next((i, v) for i, v in enumerate(values) if type(v) is not int)
        raise RowError(f"{names[key]}[{i}] must be an integer, got {type(value).__name__} {short_repr(value)}")
    try:
        return np.asarray(values, dtype=np.int64)
    except OverflowError:
        i = next(i for i, v in enumerate(values) if not -2**63 <= v < 2**63)
        raise RowError(f"{names[key]}[{i}] is {short_repr(values[i])}, too large for a token id") from None


@dataclass(frozen=True)
class ChoiceQuestion:
    context: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    context_from: str = "context"  # the field the context was read from ("question": MMLU's and ARC's)


# MMLU- and ARC-shaped files name their context `question`: read where no `context` is mapped or present.
CONTEXT_FALLBACK = "question"


def context_fallback_note(source: str) -> str:
    """What a run says, once per file, when its questions' context came from CONTEXT_FALLBACK."""
    return (f'{source}: no "context" field; the questions\' "{CONTEXT_FALLBACK}" is their context (MMLU and ARC '
            'shape; fields: {context: NAME} reads another)')


def _field(record: dict, name: str):
    """`record[name]`, or for a dotted name (`choices.text`) the nested value, when the file
    has no key of that exact name."""
    if name in record or "." not in name:
        return record.get(name)
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def choice_question(record: dict, names: dict) -> ChoiceQuestion:
    """A multiple-choice question from a record of MMLU, HellaSwag or ARC shape (with
    `fields` mapping their names: HellaSwag `{context: ctx, choices: endings, answer:
    label}`, ARC `{context: question, choices: choices.text, labels: choices.label, answer:
    answerKey}`; without a mapping an MMLU- or ARC-shaped `question` is the context and ARC's
    `choices` {text, label} the choices and labels). The answer is an index; or a string: one of `labels` (ARC's "A" or "1"),
    else a number ("2", HellaSwag), else a letter (A = the first choice), else a choice's text."""
    def get(key: str, required: bool = True, also: str = ""):
        value = _field(record, names[key])
        if value is None and required:
            shown = f'"{names[key]}"' if names[key] == key else f'"{names[key]}" ({key})'
            raise RowError(f"missing field {shown}{also}; name the file's field of it with fields: {{{key}: NAME}}")
        return value

    context_from = names["context"]
    if context_from == "context" and "context" not in record and CONTEXT_FALLBACK in record:
        context_from = CONTEXT_FALLBACK
    context = _field(record, context_from) if context_from != names["context"] else \
        get("context", also=f' (nor "{CONTEXT_FALLBACK}")' if context_from == "context" else "")
    choices, answer = get("choices"), get("answer")
    if isinstance(choices, dict) and isinstance(choices.get("text"), list) and names["labels"] not in record:
        # ARC's {"text": [...], "label": [...]}: the choices and their labels
        choices, record = choices["text"], {**record, names["labels"]: choices.get("label")}
    if not isinstance(context, str):
        raise RowError(f'field "{context_from}" must be str, got {type(context).__name__} {short_repr(context)}')
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise RowError(f'field "{names["choices"]}" must be a list of at least 2 non-empty strings, got {short_repr(choices)}')
    labels = get("labels", required=False)
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(choices)):
        raise RowError(f'field "{names["labels"]}" must be a list as long as the choices, got {short_repr(labels)}')
    index = None
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and answer.strip():
        text = answer.strip()
        if labels is not None and text in [str(label) for label in labels]:
            index = [str(label) for label in labels].index(text)
        elif text.lstrip("-").isdigit():
            index = int(text)
        elif len(text) == 1 and "A" <= text <= "Z":
            index = ord(text) - ord("A")
        elif text in [c.strip() for c in choices]:
            index = [c.strip() for c in choices].index(text)
    if index is None:
        raise RowError(f'field "{names["answer"]}": {short_repr(answer)} is neither the index of a choice, nor one of the '
                       "labels, a letter or a choice's text")
    if not 0 <= index < len(choices):
        raise RowError(f'field "{names["answer"]}": {short_repr(answer)} is not among the {len(choices)} choices')
    return ChoiceQuestion(context, tuple(choices), index, context_from)


ENCODERS = {
    "chat": ChatEncoder,
    "instruction": InstructionEncoder,
    "text": TextEncoder,
    "classification": ClassificationEncoder,
    "tokenized": TokenizedEncoder,
    "preference": PreferenceEncoder,
    "unpaired_preference": UnpairedPreferenceEncoder,
}


def build_encoder(fmt: str, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool,
                  train_on: tuple = TRAIN_ON_DEFAULT):
    return ENCODERS[fmt](tokenizer, names, train_on_prompt, tuple(train_on))


def train_on_problems(fmt: str, train_on, key: str) -> list[str]:
    """What is wrong with a data set's `train_on` (the parts of assistant turns that train)."""
    if not isinstance(train_on, list) or not train_on or not all(isinstance(p, str) for p in train_on):
        return [f"{key}: a non-empty list of {', '.join(TRAIN_PARTS)}, got {train_on!r}"]
    unknown = [p for p in train_on if p not in TRAIN_PARTS]
    if unknown:
        return [f"{key}: {unknown[0]!r} is not a part of an assistant turn; one of {', '.join(TRAIN_PARTS)} "
                "(tool results never train)"]
    if fmt == "instruction" and "content" not in train_on:
        return [f"{key}: instruction data has only the response to train on; keep content"]
    if fmt not in ("chat", "instruction", *PREFERENCE_FORMATS) and set(train_on) != set(TRAIN_PARTS):
        return [f"{key}: only chat, instruction and preference data have assistant turns, not {fmt} data"]
    return []


def record_texts(fmt: str, record: dict, names: dict) -> list[str]:
    """The free text of a record (for training a tokenizer); empty when malformed."""
    if fmt == "tokenized":
        return []
    if fmt == "chat":
        turns = record.get(names["messages"])
        if not isinstance(turns, list):
            return []
        texts = []
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            for key in ("content", "reasoning"):
                if isinstance(turn.get(names[key]), str):
                    texts.append(turn[names[key]])
            calls = turn.get(names["tool_calls"])
            for call in calls if isinstance(calls, list) else []:  # anything else is a bad row, reported later
                if isinstance(call, dict):
                    texts.append(json.dumps(call.get("function", call), ensure_ascii=False))
        return texts
    if fmt in PREFERENCE_FORMATS:
        return preference_texts(record, names)
    if fmt == "choice":
        choices = _field(record, names["choices"])
        context = _field(record, names["context"])
        return [t for t in ([context] + (choices if isinstance(choices, list) else [])) if isinstance(t, str)]
    keys = {"instruction": ("prompt", "input", "response", "system"), "text": ("text",),
            "classification": ("text",)}[fmt]
    return [record[names[k]] for k in keys if isinstance(record.get(names[k]), str)]
