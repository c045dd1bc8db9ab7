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
  `choice_question`), scored by trainer/multiple_choice.py.

Field names are mapped per dataset (`fields: {messages: conversations, role: from,
content: value}` reads sharegpt, `{prompt: instruction, input: input, response: output}`
reads alpaca); sharegpt's role names `human` and `gpt` are read as user and assistant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from jinja2 import TemplateError

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_FIELDS = {
    "chat": {"messages": "messages", "role": "role", "content": "content", "tools": "tools",
             "tool_calls": "tool_calls", "reasoning": "reasoning_content"},
    "instruction": {"prompt": "prompt", "input": "input", "response": "response", "system": "system"},
    "text": {"text": "text"},
    "classification": {"text": "text", "label": "label"},
    "tokenized": {"input_ids": "input_ids", "labels": "labels"},
    "choice": {"context": "context", "choices": "choices", "answer": "answer", "labels": "labels"},
}
IGNORE_LABEL = -100
# The parts of an assistant turn that can train (`data.datasets.N.train_on`); all by default.
TRAIN_PARTS = ("content", "reasoning", "tool_calls")
TRAIN_ON_DEFAULT = TRAIN_PARTS
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
    concatenation of its prefixes, and is checked for each record. A part of the turn that
    does not train (`train_on` without reasoning or tool_calls) is located by rendering the
    turn without it: what the two renderings do not share is that part. Tool results are
    never targets, whatever `data.train_on_prompt` says: the model reads them, a tool writes them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool,
                 train_on: tuple = TRAIN_ON_DEFAULT):
        if not tokenizer.chat_template:
            raise ConfigError("model.tokenizer: chat and instruction data need a tokenizer with a chat template")
        if not tokenizer.is_fast:
            raise ConfigError(f"model.tokenizer: chat and instruction data need a fast tokenizer (character offsets); "
                              f"{type(tokenizer).__name__} is not")
        self.tokenizer = tokenizer
        self.names = names
        self.train_on_prompt = train_on_prompt
        self.train_on = tuple(train_on)

    # ------------------------------------------------------------------ reading a record

    def messages(self, record: dict) -> list[dict]:
        return self.conversation(record).messages

    def conversation(self, record: dict) -> Conversation:
        """The record's turns as the chat template takes them (OpenAI's layout: assistant
        `tool_calls` of {type: function, function: {name, arguments}}, `tool` turns), and its tools."""
        turns = _get(record, self.names, "messages", list)
        if not turns:
            raise RowError(f'empty conversation: field "{self.names["messages"]}" has no turns')
        tools = self._tools(record)
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RowError(f'turn {i} of "{self.names["messages"]}" must be an object, got {type(turn).__name__}')
            try:
                messages.append(self._message(turn, messages))
            except RowError as err:
                raise RowError(f"turn {i}: {err}") from None
        if not any(m["role"] == "assistant" for m in messages) and not self.train_on_prompt:
            raise RowError("conversation has no assistant turn (nothing to train on)")
        return Conversation(messages, tools)

    def _message(self, turn: dict, before: list[dict]) -> dict:
        role = _get(turn, self.names, "role", str)
        role = ROLE_ALIASES.get(role, role)
        calls = _get(turn, self.names, "tool_calls", list, required=False)
        reasoning = _get(turn, self.names, "reasoning", str, required=False)
        for value, key in ((calls, "tool_calls"), (reasoning, "reasoning")):
            if value is not None and role != "assistant":
                raise RowError(f'field "{self.names[key]}" on a {role} turn; only assistant turns have {key}')
        if role == "tool":
            if not before or not (before[-1]["role"] == "tool" or before[-1].get("tool_calls")):
                raise RowError("a tool result must follow an assistant turn with tool_calls (or another tool result)")
            content = _get(turn, self.names, "content", (str, dict, list))
            message = {"role": "tool", "content": content if isinstance(content, str) else json.dumps(content)}
            for key in ("name", "tool_call_id"):
                if isinstance(turn.get(key), str):
                    message[key] = turn[key]
            return message
        content = _get(turn, self.names, "content", str, required=role != "assistant" or not (calls or reasoning))
        message = {"role": role, "content": content or ""}
        if calls:
            message["tool_calls"] = [_tool_call(call, j) for j, call in enumerate(calls)]
        if reasoning:
            message["reasoning_content"] = reasoning
        if role == "assistant" and not (message["content"].strip() or calls):
            raise RowError("assistant turn with neither content nor tool_calls")
        return message

    def _tools(self, record: dict) -> list[dict] | None:
        tools = _get(record, self.names, "tools", list, required=False)
        if not tools:
            return None
        normalised = []
        for j, tool in enumerate(tools):
            spec = tool.get("function", tool) if isinstance(tool, dict) else None
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
                raise RowError(f'{self.names["tools"]}[{j}] must be {{"type": "function", "function": {{"name": ..., '
                               f'"description": ..., "parameters": {{...}}}}}}, got {_short(tool)}')
            if "parameters" in spec and not isinstance(spec["parameters"], dict):
                raise RowError(f'{self.names["tools"]}[{j}].parameters must be a JSON schema (an object), '
                               f'got {_short(spec["parameters"])}')
            normalised.append({"type": "function", "function": spec})
        return normalised

    # ------------------------------------------------------------------ encoding

    def encode(self, record: dict) -> Encoded:
        return self.encode_messages(self.conversation(record))

    def encode_messages(self, conversation: Conversation | list[dict]) -> Encoded:
        if not isinstance(conversation, Conversation):
            conversation = Conversation(conversation, None)
        messages = conversation.messages
        text = self._render(conversation, generation_prompt=False)
        self._check_rendered(conversation, text)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = encoding["input_ids"]
        starts = np.fromiter((begin for begin, _ in encoding["offset_mapping"]), dtype=np.int64, count=len(tokens))
        if self.train_on_prompt:
            targets = np.ones(len(tokens), dtype=bool)
            for a, b in self.turn_spans(conversation, text, role="tool"):
                targets &= ~((starts >= a) & (starts < b))
            return Encoded(tokens, targets)
        targets = np.zeros(len(tokens), dtype=bool)
        for k, (a, b) in zip(self.assistant_turns(messages), self.turn_spans(conversation, text)):
            inside = (starts >= a) & (starts < b)
            for c, d in self._untrained_parts(conversation, k):
                inside &= ~((starts >= c) & (starts < d))
            targets |= inside
        if not targets[1:].any():
            raise RowError("no target tokens (assistant turns are empty)")
        return Encoded(tokens, targets)

    @staticmethod
    def assistant_turns(messages: list[dict]) -> list[int]:
        return [k for k, m in enumerate(messages) if m["role"] == "assistant"]

    def turn_spans(self, conversation: Conversation, text: str, role: str = "assistant") -> list[tuple[int, int]]:
        """Character spans in `text` (the rendered conversation) of the turns of `role`: an
        assistant turn after its header (the generation prompt), another turn whole."""
        messages = conversation.messages
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != role:
                continue
            before = conversation.upto(k)
            start = self._prefix(before) if role == "assistant" else self._render(before, generation_prompt=False)
            end = self._render(conversation.upto(k + 1), generation_prompt=False)
            if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
                raise RowError(
                    "the tokenizer's chat template renders earlier turns differently once later turns follow, "
                    "so assistant turns cannot be located; use data.train_on_prompt or another template"
                )
            spans.append((len(start), len(end)))
        return spans

    def _untrained_parts(self, conversation: Conversation, k: int) -> list[tuple[int, int]]:
        """Character spans of the parts of assistant turn `k` that `train_on` leaves out."""
        message = conversation.messages[k]
        dropped = []
        for part, key in (("reasoning", "reasoning_content"), ("tool_calls", "tool_calls"), ("content", "content")):
            if part in self.train_on or not message.get(key):
                continue
            without = {name: value for name, value in message.items() if name != key}
            if key == "content":
                without["content"] = ""
            full = self._render(conversation.upto(k + 1), generation_prompt=False)
            shorter = self._render(Conversation(conversation.messages[:k] + [without], conversation.tools),
                                   generation_prompt=False)
            dropped.append(_inserted_span(full, shorter))
        return dropped

    def _check_rendered(self, conversation: Conversation, text: str) -> None:
        """A template that ignores tools, tool calls, tool results or reasoning would train on
        conversations without them, silently: stop at the first row where one is missing."""
        for j, tool in enumerate(conversation.tools or []):
            if tool["function"]["name"] not in text:
                raise RowError(f"the chat template does not render the tools (tool {j} "
                               f"{tool['function']['name']!r} is missing); {_TEMPLATE_HINT}")
        for k, message in enumerate(conversation.messages):
            for call in message.get("tool_calls", []):
                if call["function"]["name"] not in text:
                    raise RowError(f"the chat template does not render tool_calls (turn {k} calls "
                                   f"{call['function']['name']!r}); {_TEMPLATE_HINT}")
            if message.get("reasoning_content") and message["reasoning_content"].strip() not in text:
                raise RowError(f"the chat template does not render the reasoning of turn {k} (it reads "
                               f"reasoning_content); {_TEMPLATE_HINT}")
            if message["role"] == "tool" and message["content"].strip() not in text:
                raise RowError(f"the chat template does not render the tool result of turn {k}; {_TEMPLATE_HINT}")

    def _prefix(self, conversation: Conversation) -> str:
        """The text before an assistant turn's content (its header included)."""
        try:
            return self._render(conversation, generation_prompt=True)
        except RowError:
            if conversation.messages:
                raise
            return ""  # templates may reject an empty conversation; nothing precedes the first turn

    def _render(self, conversation: Conversation | list[dict], generation_prompt: bool) -> str:
        if not isinstance(conversation, Conversation):
            conversation = Conversation(conversation, None)
        try:
            return self.tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as err:
            raise RowError(f"the chat template rejects this conversation: {err}") from None


_TEMPLATE_HINT = "use a template that does (model.chat_template: finetrain is ChatML with tools and reasoning)"


@dataclass
class Conversation:
    """What a chat template renders: the turns, and the tools offered (None: no tools)."""

    messages: list[dict]
    tools: list[dict] | None = None

    def upto(self, k: int) -> "Conversation":
        return Conversation(self.messages[:k], self.tools)


def _tool_call(call, j: int) -> dict:
    """One tool call as chat templates take it: {type, function: {name, arguments (an object)}}."""
    spec = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise RowError(f'tool_calls[{j}] must be {{"type": "function", "function": {{"name": ..., "arguments": '
                       f'{{...}}}}}}, got {_short(call)}')
    arguments = spec.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's API sends the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise RowError(f"tool_calls[{j}].function.arguments is not valid JSON: {_short(arguments)}") from None
    if not isinstance(arguments, dict):
        raise RowError(f"tool_calls[{j}].function.arguments must be an object, got {_short(arguments)}")
    normalised = {"type": "function", "function": {"name": spec["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        normalised["id"] = call["id"]
    return normalised


def _inserted_span(full: str, shorter: str) -> tuple[int, int]:
    """Where `full` has the characters that `shorter` lacks (one contiguous insertion). When the
    insertion could sit at several places (its first characters repeat what follows it, or its
    last ones what precedes it: `<think>...` before `<tool_call>`), the place that starts a line
    with a non-blank character is taken, where a template starts a block."""
    size = len(full) - len(shorter)
    prefix = 0
    while prefix < len(shorter) and full[prefix] == shorter[prefix]:
        prefix += 1
    suffix = 0
    while suffix < len(shorter) and full[-1 - suffix] == shorter[-1 - suffix]:
        suffix += 1
    first = len(shorter) - suffix  # every start in [first, prefix] gives `full` back

    def score(start: int) -> int:
        opens_line = start == 0 or full[start - 1] == "\n"
        return 2 * (opens_line and not full[start].isspace()) + (not full[start].isspace())

    start = max(range(first, prefix + 1), key=lambda p: (score(p), -p))
    return start, start + size


class InstructionEncoder:
    """prompt/input/response as one user turn and one assistant turn (optional system turn)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool,
                 train_on: tuple = TRAIN_ON_DEFAULT):
        self.chat = ChatEncoder(tokenizer, names, train_on_prompt, train_on)
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

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool, train_on: tuple = ()):
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

    def __init__(self, tokenizer: PreTrainedTokenizerBase, names: dict, train_on_prompt: bool, train_on: tuple = ()):
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
    if fmt not in ("chat", "instruction") and set(train_on) != set(TRAIN_PARTS):
        return [f"{key}: only chat and instruction data have assistant turns, not {fmt} data"]
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
            for call in turn.get(names["tool_calls"]) or []:
                if isinstance(call, dict):
                    texts.append(json.dumps(call.get("function", call), ensure_ascii=False))
        return texts
    if fmt == "choice":
        choices = _field(record, names["choices"])
        context = _field(record, names["context"])
        return [t for t in ([context] + (choices if isinstance(choices, list) else [])) if isinstance(t, str)]
    keys = {"instruction": ("prompt", "input", "response", "system"), "text": ("text",),
            "classification": ("text",)}[fmt]
    return [record[names[k]] for k in keys if isinstance(record.get(names[k]), str)]
