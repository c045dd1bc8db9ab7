"""Conversations to token ids and target masks through the tokenizer's chat template: which
tokens are assistant content, reasoning and tool calls, found by rendering prefixes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from jinja2 import TemplateError

from trainer.data.records import TRAIN_ON_DEFAULT, Encoded, RowError, get_field, short_repr
from trainer.runtime.errors import ConfigError, one_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


ROLE_ALIASES = {"human": "user", "gpt": "assistant"}



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
        turns = get_field(record, self.names, "messages", list)
        if not turns:
            raise RowError(f'empty conversation: field "{self.names["messages"]}" has no turns')
        tools = self._tools(record)
        messages = self.read_turns(turns, self.names["messages"])
        if not any(m["role"] == "assistant" for m in messages) and not self.train_on_prompt:
            raise RowError("conversation has no assistant turn (nothing to train on)")
        return Conversation(messages, tools)

    def read_turns(self, turns: list, field: str, before: tuple = ()) -> list[dict]:
        """The turns of a list (the field `field`) as the chat template takes them, each checked;
        `before`: the turns that precede them (a tool result must follow a tool call)."""
        messages = list(before)
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RowError(f'turn {i} of "{field}" must be an object, got {type(turn).__name__}')
            try:
                messages.append(self._message(turn, messages))
            except RowError as err:
                raise RowError(f"turn {i}: {err}") from None
        return messages[len(before):]

    def _message(self, turn: dict, before: list[dict]) -> dict:
        role = get_field(turn, self.names, "role", str)
        role = ROLE_ALIASES.get(role, role)
        calls = get_field(turn, self.names, "tool_calls", list, required=False)
        reasoning = get_field(turn, self.names, "reasoning", str, required=False)
        for value, key in ((calls, "tool_calls"), (reasoning, "reasoning")):
            if value is not None and role != "assistant":
                raise RowError(f'field "{self.names[key]}" on a {role} turn; only assistant turns have {key}')
        if role == "tool":
            if not before or not (before[-1]["role"] == "tool" or before[-1].get("tool_calls")):
                raise RowError("a tool result must follow an assistant turn with tool_calls (or another tool result)")
            content = get_field(turn, self.names, "content", (str, dict, list))
            message = {"role": "tool", "content": content if isinstance(content, str) else json.dumps(content)}
            for key in ("name", "tool_call_id"):
                if isinstance(turn.get(key), str):
                    message[key] = turn[key]
            return message
        content = get_field(turn, self.names, "content", str, required=role != "assistant" or not (calls or reasoning))
        message = {"role": role, "content": content or ""}
        if calls:
            message["tool_calls"] = [_tool_call(call, j) for j, call in enumerate(calls)]
        if reasoning:
            message["reasoning_content"] = reasoning
        if role == "assistant" and not (message["content"].strip() or calls):
            raise RowError("assistant turn with neither content nor tool_calls")
        return message

    def _tools(self, record: dict) -> list[dict] | None:
        tools = get_field(record, self.names, "tools", list, required=False)
        if not tools:
            return None
        normalised = []
        for j, tool in enumerate(tools):
            spec = tool.get("function", tool) if isinstance(tool, dict) else None
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
                raise RowError(f'{self.names["tools"]}[{j}] must be {{"type": "function", "function": {{"name": ..., '
                               f'"description": ..., "parameters": {{...}}}}}}, got {short_repr(tool)}')
            if "parameters" in spec and not isinstance(spec["parameters"], dict):
                raise RowError(f'{self.names["tools"]}[{j}].parameters must be a JSON schema (an object), '
                               f'got {short_repr(spec["parameters"])}')
            normalised.append({"type": "function", "function": spec})
        return normalised

    # ------------------------------------------------------------------ encoding

    def encode(self, record: dict) -> Encoded:
        return self.encode_messages(self.conversation(record))

    def encode_messages(self, conversation: Conversation | list[dict], from_turn: int = 0) -> Encoded:
        """The conversation's tokens and targets; `from_turn`: only assistant turns from this index
        on train (a preference completion after its prompt's turns)."""
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
            if k < from_turn:
                continue
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
            end = self._closed_turn(conversation.upto(k + 1), text)
            if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
                raise RowError(
                    f"the chat template renders turn {k} ({role}) differently once later turns follow (as Qwen 3's "
                    "drops the reasoning of earlier assistant turns), so the tokens to train cannot be located; "
                    "end each row at such a turn (split the conversation), or use another template "
                    "(model.chat_template: finetrain keeps every turn as it was)"
                )
            spans.append((len(start), len(end)))
        return spans

    def _closed_turn(self, upto: Conversation, text: str) -> str:
        """The rendering of the conversation up to a turn, as the whole conversation's `text` holds
        it: a template that ends every rendered conversation with the EOS token (Phi-3's) ends it
        only after the last turn, so an earlier turn ends before that token."""
        end = self._render(upto, generation_prompt=False)
        eos = self.tokenizer.eos_token
        if eos and end.endswith(eos) and not text.startswith(end) and text.startswith(end[: -len(eos)]):
            return end[: -len(eos)]
        return end

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
        except (TemplateError, ValueError) as err:  # ValueError: transformers' own refusals (an empty conversation)
            raise RowError(f"the chat template rejects this conversation: {one_line(str(err))}") from None



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
                       f'{{...}}}}}}, got {short_repr(call)}')
    arguments = spec.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's API sends the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise RowError(f"tool_calls[{j}].function.arguments is not valid JSON: {short_repr(arguments)}") from None
    if not isinstance(arguments, dict):
        raise RowError(f"tool_calls[{j}].function.arguments must be an object, got {short_repr(arguments)}")
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
