"""Records to token ids and target masks, one encoder per data format.

- chat: `messages` [{role, content}] rendered with the tokenizer's chat template; the
  targets are the assistant turns (all tokens with `data.train_on_prompt`).
- instruction: `prompt` (+ optional `input`, `system`) and `response`, rendered as a
  user/assistant exchange through the same chat template.
- text: the text followed by EOS; every token is a target (continued pretraining).
- classification: `text` and `label`; an integer class id, or a class name (string).
- tokenized: `input_ids` from the user's own pipeline, and optional `labels` (the ids
  again where a token is a target, -100 where not; unshifted, as in Hugging Face).
- choice (evaluation only): a `context`, its `choices` and the `answer` (see
  `choice_question`), scored by trainer/multiple_choice.py.

Field names are mapped per dataset (`fields: {messages: conversations, role: from,
content: value}` reads sharegpt, `{prompt: instruction, input: input, response: output}`
reads alpaca); sharegpt's role names `human` and `gpt` are read as user and assistant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from trainer.errors import ConfigError

DEFAULT_FIELDS = {
    "chat": {"messages": "messages", "role": "role", "content": "content"},
    "instruction": {"prompt": "prompt", "input": "input", "response": "response", "system": "system"},
    "text": {"text": "text"},
    "classification": {"text": "text", "label": "label"},
    "tokenized": {"input_ids": "input_ids", "labels": "labels"},
    "choice": {"context": "context", "choices": "choices", "answer": "answer", "labels": "labels"},
}
IGNORE_LABEL = -100
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}


class RowError(ValueError):
    """What is wrong with one record; the caller prefixes its file and line."""


@dataclass
class Encoded:
    tokens: list[int] | np.ndarray
    targets: list[bool] | np.ndarray = field(default_factory=list)  # causal formats: which tokens are trained on
    label: int | str | None = None  # classification: raw label, mapped to an id when all are known


def field_names(fmt: str, mapping: dict, where: str) -> dict[str, str]:
    """finetrain's field names -> the file's, checking the mapping names real fields."""
    names = dict(DEFAULT_FIELDS[fmt])
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} for format {fmt}; known: {', '.join(names)}")
    for key, value in mapping.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.{key}: expected a field name, got {value!r}")
        names[key] = value
    return names


def _get(record: dict, names: dict, key: str, kind: type | tuple, required: bool = True):
    name = names[key]
    shown = f'"{name}"' if name == key else f'"{name}" ({key})'
    if name not in record or record[name] is None:
        if required:
            raise RowError(f"missing field {shown}")
        return None
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RowError(f"field {shown} must be {expected}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ChatEncoder:
    """Renders a conversation with the chat template and marks the assistant turns.

    An assistant turn's span is found by rendering prefixes of the conversation: it starts
    where the prefix up to it, with the generation prompt, ends, and ends where the prefix
    including it ends. This works for any template that renders a conversation as the
    concatenation of its prefixes, and is checked for each record."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool):
        if not tokenizer.chat_template:
            raise ConfigError("model.tokenizer: chat and instruction data need a tokenizer with a chat template")
        if not tokenizer.is_fast:
            raise ConfigError(f"model.tokenizer: chat and instruction data need a fast tokenizer (character offsets); "
                              f"{type(tokenizer).__name__} is not")
        self.tokenizer = tokenizer
        self.names = names
        self.train_on_prompt = train_on_prompt

    def messages(self, record: dict) -> list[dict]:
        turns = _get(record, self.names, "messages", list)
        if not turns:
            raise RowError(f'empty conversation: field "{self.names["messages"]}" has no turns')
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RowError(f'turn {i} of "{self.names["messages"]}" must be an object, got {type(turn).__name__}')
            try:
                role = _get(turn, self.names, "role", str)
                content = _get(turn, self.names, "content", str)
            except RowError as err:
                raise RowError(f"turn {i}: {err}") from None
            messages.append({"role": ROLE_ALIASES.get(role, role), "content": content})
        if not any(m["role"] == "assistant" for m in messages) and not self.train_on_prompt:
            raise RowError("conversation has no assistant turn (nothing to train on)")
        return messages

    def encode(self, record: dict) -> Encoded:
        return self.encode_messages(self.messages(record))

    def encode_messages(self, messages: list[dict]) -> Encoded:
        text = self._render(messages, generation_prompt=False)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = encoding["input_ids"]
        if self.train_on_prompt:
            return Encoded(tokens, [True] * len(tokens))
        spans = self._assistant_spans(messages, text)
        starts = np.fromiter((begin for begin, _ in encoding["offset_mapping"]), dtype=np.int64, count=len(tokens))
        targets = np.zeros(len(tokens), dtype=bool)
        for a, b in spans:
            targets |= (starts >= a) & (starts < b)
        if not targets[1:].any():
            raise RowError("no target tokens (assistant turns are empty)")
        return Encoded(tokens, targets)

    def _assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in `text`, the rendered conversation."""
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._prefix(messages[:k])
            end = self._render(messages[: k + 1], generation_prompt=False)
            if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
                raise RowError(
                    "the tokenizer's chat template renders earlier turns differently once later turns follow, "
                    "so assistant turns cannot be located; use data.train_on_prompt or another template"
                )
            spans.append((len(start), len(end)))
        return spans

    def _prefix(self, messages: list[dict]) -> str:
        """The text before an assistant turn's content (its header included)."""
        try:
            return self._render(messages, generation_prompt=True)
        except RowError:
            if messages:
                raise
            return ""  # templates may reject an empty conversation; nothing precedes the first turn

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as err:
            raise RowError(f"the chat template rejects this conversation: {err}") from None


class InstructionEncoder:
    """prompt/input/response as one user turn and one assistant turn (optional system turn)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool):
        self.chat = ChatEncoder(tokenizer, names, train_on_prompt)
        self.names = names

    def messages(self, record: dict) -> list[dict]:
        prompt = _get(record, self.names, "prompt", str)
        extra = _get(record, self.names, "input", str, required=False)
        response = _get(record, self.names, "response", str)
        system = _get(record, self.names, "system", str, required=False)
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

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool):
        if tokenizer.eos_token_id is None:
            raise ConfigError("model.tokenizer: text data needs a tokenizer with an EOS token to end each document")
        self.tokenizer = tokenizer
        self.names = names

    def encode(self, record: dict) -> Encoded:
        text = _get(record, self.names, "text", str)
        if not text.strip():
            raise RowError(f'empty field "{self.names["text"]}"')
        tokens = self.tokenizer(text)["input_ids"]
        if not tokens or tokens[-1] != self.tokenizer.eos_token_id:
            tokens.append(self.tokenizer.eos_token_id)
        return Encoded(tokens, [True] * len(tokens))


class ClassificationEncoder:
    """Text with the tokenizer's special tokens, and its label (int, or a class name)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool):
        self.tokenizer = tokenizer
        self.names = names

    def encode(self, record: dict) -> Encoded:
        text = _get(record, self.names, "text", str)
        label = _get(record, self.names, "label", (int, str))
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

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool):
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
        wrong = ~targets & (labels != IGNORE_LABEL)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise RowError(f'{self.names["labels"]}[{i}] is {labels[i]}: a label is the token id at its position '
                           f'({ids[i]}) or {IGNORE_LABEL}')
        if not targets[1:].any():
            raise RowError(f"no target tokens: every label after the first is {IGNORE_LABEL}")
        return Encoded(ids, targets)


def _integers(record: dict, names: dict, key: str, required: bool) -> np.ndarray | None:
    """A field that must be a list of integers (not booleans), as an int64 array."""
    values = _get(record, names, key, list, required)
    if values is None:
        return None
    if not set(map(type, values)) <= {int}:
        i, value = next((i, v) for i, v in enumerate(values) if type(v) is not int)
        raise RowError(f"{names[key]}[{i}] must be an integer, got {type(value).__name__} {_short(value)}")
    try:
        return np.asarray(values, dtype=np.int64)
    except OverflowError:
        i = next(i for i, v in enumerate(values) if not -2**63 <= v < 2**63)
        raise RowError(f"{names[key]}[{i}] is {_short(values[i])}, too large for a token id") from None


@dataclass(frozen=True)
class ChoiceQuestion:
    context: str
    choices: tuple[str, ...]
    answer: int  # index into choices


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
    answerKey}`). The answer is an index; or a string: one of `labels` (ARC's "A" or "1"),
    else a number ("2", HellaSwag), else a letter (A = the first choice), else a choice's text."""
    def get(key: str, required: bool = True):
        value = _field(record, names[key])
        if value is None and required:
            shown = f'"{names[key]}"' if names[key] == key else f'"{names[key]}" ({key})'
            raise RowError(f"missing field {shown}")
        return value

    context, choices, answer = get("context"), get("choices"), get("answer")
    if not isinstance(context, str):
        raise RowError(f'field "{names["context"]}" must be str, got {type(context).__name__} {_short(context)}')
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise RowError(f'field "{names["choices"]}" must be a list of at least 2 non-empty strings, got {_short(choices)}')
    labels = get("labels", required=False)
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(choices)):
        raise RowError(f'field "{names["labels"]}" must be a list as long as the choices, got {_short(labels)}')
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
        raise RowError(f'field "{names["answer"]}": {_short(answer)} is neither the index of a choice, nor one of the '
                       "labels, a letter or a choice's text")
    if not 0 <= index < len(choices):
        raise RowError(f'field "{names["answer"]}": {_short(answer)} is not among the {len(choices)} choices')
    return ChoiceQuestion(context, tuple(choices), index)


ENCODERS = {
    "chat": ChatEncoder,
    "instruction": InstructionEncoder,
    "text": TextEncoder,
    "classification": ClassificationEncoder,
    "tokenized": TokenizedEncoder,
}


def build_encoder(fmt: str, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool):
    return ENCODERS[fmt](tokenizer, names, train_on_prompt)


def record_texts(fmt: str, record: dict, names: dict) -> list[str]:
    """The free text of a record (for training a tokenizer); empty when malformed."""
    if fmt == "tokenized":
        return []
    if fmt == "chat":
        turns = record.get(names["messages"])
        if not isinstance(turns, list):
            return []
        return [t[names["content"]] for t in turns if isinstance(t, dict) and isinstance(t.get(names["content"]), str)]
    if fmt == "choice":
        choices = _field(record, names["choices"])
        context = _field(record, names["context"])
        return [t for t in ([context] + (choices if isinstance(choices, list) else [])) if isinstance(t, str)]
    keys = {"instruction": ("prompt", "input", "response", "system"), "text": ("text",),
            "classification": ("text",)}[fmt]
    return [record[names[k]] for k in keys if isinstance(record.get(names[k]), str)]
