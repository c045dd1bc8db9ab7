"""Training on the tokenizer's own chat template, proven on templates written here in the formats of
the common families (Llama 3, Qwen 2.5 and Qwen 3 with tools and reasoning, Mistral, Gemma, Phi-3):
each renders a conversation exactly as the family does (the text is built here by hand), the trained
positions are exactly the assistant turns' content and end-of-turn tokens (a mask built by hand from
that text), and the end-of-turn check passes. Qwen 3's template renders an earlier assistant turn
differently once a later user turn follows (it drops its reasoning): such a row is refused in one
line; Phi-3's closes every conversation with its EOS token, which only the last turn trains."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from helpers import TINY_LLAMA, write_jsonl
from trainer.config.schema import Config, DatasetConfig, ModelConfig
from trainer.data.chat import ChatEncoder
from trainer.data.end_of_turn import check_end_of_turn
from trainer.data.records import RowError, field_names
from trainer.data.run_data import RunData
from trainer.runtime.errors import DataError

LLAMA3 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_QWEN_TOOLS = (
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
)
_QWEN_CALLS = (
    "{%- for call in message.tool_calls %}{%- set call = call.function if call.function is defined else call %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' + (call.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
)
_QWEN_TOOL_RESULT = (
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
)
QWEN25 = (
    "{%- if tools %}" + _QWEN_TOOLS + "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' and not message.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}{%- set call = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' + (call.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}" + _QWEN_TOOL_RESULT + "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3 = (
    "{%- if tools %}" + _QWEN_TOOLS + "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and not (message.content.startswith('<tool_response>') "
    "and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is defined and "
    "message.reasoning_content else '' %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    + _QWEN_CALLS + "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}" + _QWEN_TOOL_RESULT + "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{- '<s>' }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + '</s>' }}{%- endif %}"
    "{%- endfor %}"
)
GEMMA = (
    "{{- '<bos>' }}{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
PHI3 = (
    "{%- for message in messages %}{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen": [],  # ChatML's <|im_start|> and <|im_end|> are the test tokenizer's own
    "mistral": ["<s>", "</s>", "[INST]", "[/INST]"],
    "gemma": ["<bos>", "<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"],
}

TWO_TURNS = [{"role": "user", "content": "What is two plus three?"}, {"role": "assistant", "content": "Five."},
             {"role": "user", "content": "And times?"}, {"role": "assistant", "content": "Six."}]
WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather of a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
TOOL_ROUND = [{"role": "user", "content": "Weather in Oslo?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning_content": "I should look it up."},
              {"role": "tool", "content": "rain, 7 C"},
              {"role": "assistant", "content": "Rain and 7 C.", "reasoning_content": "The tool says rain."}]
TOOLS_HEADER = ("<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>\n\nFor each function call, return a json object "
                "with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')
CALL_TEXT = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
QWEN25_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

# family -> (template, extra special tokens, messages, tools, the rendered text as (piece, trained) by hand)
FAMILIES = {
    "llama3": (LLAMA3, "llama3", TWO_TURNS, None, [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is two plus three?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("Five.<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd times?<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
         "\n\n", False), ("Six.<|eot_id|>", True)]),
    "qwen2.5": (QWEN25, "qwen", TWO_TURNS, None, [
        (QWEN25_SYSTEM + "<|im_start|>user\nWhat is two plus three?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Five.<|im_end|>\n", True), ("<|im_start|>user\nAnd times?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Six.<|im_end|>\n", True)]),
    "qwen2.5-tools": (QWEN25, "qwen", [{k: v for k, v in m.items() if k != "reasoning_content"} for m in TOOL_ROUND],
                      [WEATHER], [
        (TOOLS_HEADER + "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n", False),
        (CALL_TEXT + "<|im_end|>\n", True),
        ("<|im_start|>user\n<tool_response>\nrain, 7 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("Rain and 7 C.<|im_end|>\n", True)]),
    "qwen3-tools-reasoning": (QWEN3, "qwen", TOOL_ROUND, [WEATHER], [
        (TOOLS_HEADER + "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nI should look it up.\n</think>\n\n" + CALL_TEXT + "<|im_end|>\n", True),
        ("<|im_start|>user\n<tool_response>\nrain, 7 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nThe tool says rain.\n</think>\n\nRain and 7 C.<|im_end|>\n", True)]),
    "mistral": (MISTRAL, "mistral", TWO_TURNS, None, [
        ("<s>[INST]What is two plus three?[/INST]", False), ("Five.</s>", True), ("[INST]And times?[/INST]", False),
        ("Six.</s>", True)]),
    "gemma": (GEMMA, "gemma", TWO_TURNS, None, [
        ("<bos><start_of_turn>user\nWhat is two plus three?<end_of_turn>\n<start_of_turn>model\n", False),
        ("Five.<end_of_turn>\n", True), ("<start_of_turn>user\nAnd times?<end_of_turn>\n<start_of_turn>model\n", False),
        ("Six.<end_of_turn>\n", True)]),
    "phi3": (PHI3, "phi3", TWO_TURNS, None, [
        ("<|user|>\nWhat is two plus three?<|end|>\n<|assistant|>\n", False), ("Five.<|end|>\n", True),
        ("<|user|>\nAnd times?<|end|>\n<|assistant|>\n", False), ("Six.<|end|>\n<|endoftext|>", True)]),
}
EOT = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen2.5-tools": "<|im_end|>",
       "qwen3-tools-reasoning": "<|im_end|>", "mistral": "</s>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}


def family_tokenizer(base, family: str):
    template, specials, *_ = FAMILIES[family]
    tokenizer = copy.deepcopy(base)
    if specials == "phi3":
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[specials]})
    tokenizer.chat_template = template
    return tokenizer


def record(messages: list[dict], tools: list | None) -> dict:
    """The conversation as a data file holds it (reasoning under finetrain's `reasoning_content`)."""
    return {"messages": messages, **({"tools": tools} if tools else {})}


def hand_mask(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], np.ndarray]:
    """Tokens of the hand-built text and which are trained: those starting inside a trained piece."""
    text = "".join(piece for piece, _ in pieces)
    trained_chars = np.concatenate([np.full(len(piece), trained) for piece, trained in pieces])
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoding["input_ids"], np.array([trained_chars[begin] for begin, _ in encoding["offset_mapping"]])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_familys_template_trains_exactly_the_assistant_turns_and_their_end_of_turn(family, tiny_tokenizer,
                                                                                         tmp_path):
    _, _, messages, tools, pieces = FAMILIES[family]
    tokenizer = family_tokenizer(tiny_tokenizer, family)
    assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == "".join(p for p, _ in pieces)
    encoder = ChatEncoder(tokenizer, field_names("chat", {}, "fields"), train_on_prompt=False)
    encoded = encoder.encode(record(messages, tools))
    tokens, expected = hand_mask(tokenizer, pieces)
    assert list(encoded.tokens) == tokens
    assert np.asarray(encoded.targets).tolist() == expected.tolist()
    assert tokenizer.decode([t for t, trained in zip(tokens, expected) if trained]) == \
        "".join(p for p, trained in pieces if trained)

    cfg = Config()
    cfg.model = ModelConfig(config=dict(TINY_LLAMA), tokenizer="train-bpe")
    cfg.data.datasets = [DatasetConfig(name="sft", path=str(write_jsonl(tmp_path / "sft.jsonl",
                                                                         [record(messages, tools)] * 2)))]
    cfg.data.cache_dir = str(tmp_path / "cache")
    turns = sum(m["role"] == "assistant" for m in messages)
    assert check_end_of_turn(cfg, tokenizer, f"the {family} template") == [
        f"end-of-turn check (the {family} template): {EOT[family]!r} is a target at the end of all {2 * turns} "
        "assistant turns of the first 2 rows of sft"]


def test_qwen3_dropping_earlier_reasoning_is_refused_in_one_line(tiny_tokenizer, tmp_path):
    """Two user turns, each answered with reasoning: Qwen 3's template renders the first answer
    without its reasoning once the second user turn follows, so what it trains cannot be located."""
    tokenizer = family_tokenizer(tiny_tokenizer, "qwen3-tools-reasoning")
    reasoned = [{**m, "reasoning_content": "Think first."} if m["role"] == "assistant" else m for m in TWO_TURNS]
    encoder = ChatEncoder(tokenizer, field_names("chat", {}, "fields"), train_on_prompt=False)
    with pytest.raises(RowError, match=r"^the chat template renders turn 1 \(assistant\) differently once later turns"):
        encoder.encode(record(reasoned, None))
    assert encoder.encode(record(reasoned[:2], None)).targets[1:].any()  # one answer per row trains

    cfg = Config()
    cfg.model = ModelConfig(config=dict(TINY_LLAMA), tokenizer="train-bpe")
    path = write_jsonl(tmp_path / "multi.jsonl", [record(reasoned[:2], None), record(reasoned, None)])
    cfg.data.datasets = [DatasetConfig(name="multi", path=str(path))]
    cfg.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(DataError) as err:
        RunData.load(cfg, tokenizer, report=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}:2: the chat template renders turn 1 (assistant) "
                                                      "differently once later turns follow (as Qwen 3's drops the "
                                                      "reasoning of earlier assistant turns)")
