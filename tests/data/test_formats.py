"""Formats (chat, instruction, text, classification), field mapping, over-long examples,
and invariant 6 for data: every kind of bad row is named by file and line, or skipped
and counted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import TINY_BERT, TINY_LLAMA, write_jsonl
from trainer.config.schema import DatasetConfig, load_config
from trainer.data.chat import ChatEncoder
from trainer.data.loader import build_train_loader
from trainer.data.prepare import EncodingSpec, load_tokenized
from trainer.data.records import field_names
from trainer.data.run_data import training_texts
from trainer.plan import plan_run
from trainer.runtime.errors import ConfigError, DataError

CHAT = {"messages": [{"role": "user", "content": "What is two plus three?"},
                     {"role": "assistant", "content": "Five."},
                     {"role": "user", "content": "And times?"},
                     {"role": "assistant", "content": "Six."}]}


def config(tmp_path: Path, rows: list, fmt: str = "chat", name: str = "sft.jsonl", fields: dict | None = None,
           task: str = "causal_lm", tokenizer: str = "train-bpe", **data):
    path = tmp_path / name
    write_jsonl(path, rows)
    dataset = {"name": "sft", "path": str(path), "format": fmt}
    if fields:
        dataset["fields"] = fields
    model = {"config": dict(TINY_LLAMA), "tokenizer": tokenizer}
    if task == "sequence_classification":
        model = {"config": dict(TINY_BERT), "tokenizer": "train-bpe", "task": task, "num_labels": 3}
        data.setdefault("packing", False)
    cfg = {"run": {"output_dir": str(tmp_path / "run")}, "model": model,
           "data": {"seq_len": 128, "datasets": [dataset], "cache_dir": str(tmp_path / "cache"), **data},
           "train": {"micro_batch_size": 2, "global_batch_size": 2, "max_steps": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(tmp_path / "config.yaml"), path


def examples_of(cfg, tokenizer):
    """The training data set of a one-data-set config, as the loader sees it."""
    return build_train_loader(cfg, tokenizer, "sdpa", 0, 1).stream.datasets[0]


def target_text(tokenizer, ds, i: int) -> str:
    tokens, targets = ds.data.example_tokens(i), ds.data.example_targets(i)
    return tokenizer.decode(tokens[targets].tolist())


# ----------------------------------------------------------------------------- formats


def test_chat_targets_are_exactly_the_assistant_turns(tmp_path, tiny_tokenizer):
    cfg, _ = config(tmp_path, [CHAT])
    ds = examples_of(cfg, tiny_tokenizer)
    assert target_text(tiny_tokenizer, ds, 0) == "Five.<|im_end|>\nSix.<|im_end|>\n"
    rendered = tiny_tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tiny_tokenizer.decode(ds.data.example_tokens(0).tolist()) == rendered


def test_train_on_prompt_targets_everything(tmp_path, tiny_tokenizer):
    cfg, _ = config(tmp_path, [CHAT], train_on_prompt=True)
    ds = examples_of(cfg, tiny_tokenizer)
    assert ds.data.example_targets(0).all()


def test_sharegpt_fields_and_roles(tmp_path, tiny_tokenizer):
    sharegpt = {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                  for m in CHAT["messages"]]}
    cfg, _ = config(tmp_path, [sharegpt], fields={"messages": "conversations", "role": "from", "content": "value"})
    mapped = examples_of(cfg, tiny_tokenizer)
    reference, _ = config(tmp_path / "ref", [CHAT])
    plain = examples_of(reference, tiny_tokenizer)
    assert np.array_equal(mapped.data.tokens, plain.data.tokens)
    assert np.array_equal(mapped.data.targets, plain.data.targets)


def test_alpaca_instruction_fields(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hello.", "input": "", "output": "hello"}]
    cfg, _ = config(tmp_path, rows, fmt="instruction", fields={"prompt": "instruction", "response": "output"})
    ds = examples_of(cfg, tiny_tokenizer)
    text = tiny_tokenizer.decode(ds.data.example_tokens(0).tolist())
    assert "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>" in text
    assert target_text(tiny_tokenizer, ds, 0) == "5<|im_end|>\n"
    assert "Say hello.<|im_end|>" in tiny_tokenizer.decode(ds.data.example_tokens(1).tolist())


def test_text_documents_end_with_eos_and_train_on_everything(tmp_path, tiny_tokenizer):
    cfg, _ = config(tmp_path, [{"text": "The quick brown fox."}], fmt="text")
    ds = examples_of(cfg, tiny_tokenizer)
    tokens = ds.data.example_tokens(0).tolist()
    assert tokens[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(tokens[:-1]) == "The quick brown fox."
    assert ds.data.example_targets(0).all() and ds.splittable


def test_classification_class_names_map_in_sorted_order(tmp_path, tiny_tokenizer):
    rows = [{"text": "red blue", "label": "pos"}, {"text": "cat dog", "label": "neg"}, {"text": "sun", "label": "mixed"}]
    cfg, _ = config(tmp_path, rows, fmt="classification", task="sequence_classification")
    ds = examples_of(cfg, tiny_tokenizer)
    assert [ds.class_id(i) for i in range(3)] == [2, 1, 0]  # mixed=0, neg=1, pos=2
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    batch = loader.next_step(1)[0]
    assert batch.labels.dim() == 1 and batch.num_targets == 2
    assert set(batch.inputs) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("label, problem", [(7, "label 7 is not in [0, 3)"),
                                            (0.5, 'field "label" must be int or str, got float')])
def test_a_bad_classification_label_is_reported_at_its_line(tmp_path, tiny_tokenizer, label, problem):
    cfg, path = config(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": label}], fmt="classification",
                       task="sequence_classification")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {problem}")):
        build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)


def test_unknown_field_mapping_is_refused(tmp_path, tiny_tokenizer):
    cfg, _ = config(tmp_path, [CHAT], fields={"mesages": "conversations"})
    with pytest.raises(ValueError, match=r"data.datasets.0.fields: unknown field 'mesages' for format chat"):
        build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)


def test_template_that_rewrites_history_is_detected(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, field_names("chat", {}, "fields"), train_on_prompt=False)
    original = tiny_tokenizer.chat_template
    try:  # a template that prints the number of turns first changes every prefix
        tiny_tokenizer.chat_template = "{{ messages|length }}" + original
        with pytest.raises(ValueError, match="differently once later turns follow"):
            encoder.encode(CHAT)
    finally:
        tiny_tokenizer.chat_template = original


def test_training_texts_yield_record_text(tmp_path, tiny_tokenizer):
    cfg, _ = config(tmp_path, [CHAT, "{broken"])
    texts = list(training_texts(cfg))
    assert texts == [m["content"] for m in CHAT["messages"]]


# ----------------------------------------------------------------------------- over-long examples


def long_chat(words: int) -> dict:
    return {"messages": [{"role": "user", "content": "say " + "word " * words},
                         {"role": "assistant", "content": "ok " * 5}]}


def test_overlong_truncate_drop_error(tmp_path, tiny_tokenizer):
    rows = [CHAT, long_chat(10), long_chat(200), {"messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "answer " * 200}]}]
    cfg, path = config(tmp_path, rows, overlong="truncate")
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    ds = loader.stream.datasets[0]
    # row 3's prompt alone fills the row (no target left): dropped; row 4 truncated
    assert loader.stats["sft/overlong_truncated"] == 1 and loader.stats["sft/overlong_dropped"] == 1
    assert list(ds.examples) == [0, 1, 3] and ds.length(3) == 128

    cfg, path = config(tmp_path / "drop", rows, overlong="drop")
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    assert loader.stats["sft/overlong_dropped"] == 2 and list(loader.stream.datasets[0].examples) == [0, 1]

    cfg, path = config(tmp_path / "error", rows, overlong="error")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: example of ") + r"\d+ tokens is longer than data.seq_len 128"):
        build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)


# ----------------------------------------------------------------------------- bad rows

BAD_ROWS = [
    ("chat", '{"messages": [', "not valid JSON"),
    ("chat", "[1, 2]", "expected a JSON object, got list"),
    ("chat", b'{"messages": "caf\xe9"}', "not valid UTF-8 (byte 0xe9"),
    ("chat", {"msgs": []}, 'missing field "messages"'),
    ("chat", {"messages": "hello"}, 'field "messages" must be list, got str'),
    ("chat", {"messages": []}, "empty conversation"),
    ("chat", {"messages": [{"role": "user"}]}, 'turn 0: missing field "content"'),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 'turn 0: field "content" must be str, got int'),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ("instruction", {"prompt": "hi"}, 'missing field "response"'),
    ("instruction", {"prompt": "hi", "response": "  "}, 'empty field "response"'),
    ("text", {"text": ""}, 'empty field "text"'),
    ("text", {"text": ["a"]}, 'field "text" must be str, got list'),
]


@pytest.mark.parametrize("fmt,bad,message", BAD_ROWS, ids=[m for _, _, m in BAD_ROWS])
def test_bad_row_is_named_by_file_and_line(tmp_path, tiny_tokenizer, fmt, bad, message):
    good = {"chat": CHAT, "instruction": {"prompt": "p", "response": "r"}, "text": {"text": "some text"}}[fmt]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(good).encode()] * 2 + [bad if isinstance(bad, bytes) else
                                               (bad if isinstance(bad, str) else json.dumps(bad)).encode()]
    path.write_bytes(b"\n".join(lines + [json.dumps(good).encode()]) + b"\n")
    cfg, _ = config(tmp_path, [], fmt=fmt, name="unused.jsonl")
    cfg.data.datasets[0].path = str(path)
    with pytest.raises(DataError) as err:
        build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_skip_mode_counts_bad_rows(tmp_path, tiny_tokenizer):
    rows = [CHAT, "{oops", {"messages": []}, CHAT, {"messages": "x"}, CHAT]
    cfg, _ = config(tmp_path, rows, on_bad_row="skip")
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    assert loader.stats["sft/bad_rows_skipped"] == 3
    assert len(loader.stream.datasets[0].examples) == 3
    assert loader.stream.datasets[0].data.rows.tolist() == [1, 4, 6]


def test_only_bad_rows_is_an_error_even_when_skipping(tmp_path, tiny_tokenizer):
    cfg, path = config(tmp_path, ["{oops", {"messages": []}], on_bad_row="skip")
    with pytest.raises(DataError, match=re.escape(f"{path}: no usable examples (2 bad rows skipped; first: {path}:1: not valid JSON")):
        build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)


def test_bad_row_in_a_parquet_file_names_the_row(tmp_path, tiny_tokenizer):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list([{"text": "fine", "label": 1}, {"text": None, "label": 0}]).to_parquet(str(path))
    spec = EncodingSpec("classification", field_names("classification", {}, "fields"), False, tiny_tokenizer)
    with pytest.raises(DataError, match=re.escape(f'{path}: row 2: missing field "text"')):
        load_tokenized(path, str(path), spec, "error", tmp_path / "cache")


def test_undecodable_csv_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,label\nfine,1\nbad \xff byte,0\n")
    spec = EncodingSpec("classification", field_names("classification", {}, "fields"), False, tiny_tokenizer)
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid UTF-8 (byte 0xff")):
        load_tokenized(path, str(path), spec, "error", tmp_path / "cache")


def test_packing_with_prompt_tuning_is_refused(tmp_path, tiny_tokenizer):
    cfg, _ = config(tmp_path, [CHAT])
    cfg.peft.method = "prompt_tuning"
    with pytest.raises(ConfigError, match="data.packing: peft.method prompt_tuning prepends its virtual tokens"):
        plan_run(cfg, 1, "cpu")
    cfg.data.packing = False
    batch = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1).next_step(1)[0]
    assert "position_ids" not in batch.inputs  # peft would drop them with a warning on every forward


# ----------------------------------------------------------------------------- pre-tokenized data


def tokenized_config(tmp_path: Path, tokenizer, rows: list, **data):
    """A config training on pre-tokenized `rows`, made with (and read with) `tokenizer`."""
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return config(tmp_path, rows, fmt="tokenized", name="ids.jsonl", tokenizer=str(tmp_path / "tokenizer"), **data)


def test_tokenized_rows_keep_their_ids_and_targets(tmp_path, tiny_tokenizer):
    rows = [{"input_ids": [7, 8, 9, 10], "labels": [-100, -100, 9, 10]}, {"input_ids": [11, 12, 13]}]
    cfg, _ = tokenized_config(tmp_path, tiny_tokenizer, rows)
    ds = examples_of(cfg, tiny_tokenizer)
    assert ds.data.example_tokens(0).tolist() == [7, 8, 9, 10]
    assert ds.data.example_targets(0).tolist() == [False, False, True, True]
    assert ds.data.example_tokens(1).tolist() == [11, 12, 13] and ds.data.example_targets(1).all()


def test_tokenized_data_is_packed_and_mixed_like_the_rest(tmp_path, tiny_tokenizer):
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] + list(range(6, 5 + n))} for n in range(3, 23)]
    cfg, _ = tokenized_config(tmp_path, tiny_tokenizer, rows)
    cfg.data.datasets[0].weight = 0.5
    chat = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 20)
    cfg.data.datasets.append(DatasetConfig(name="chat", path=str(chat), format="chat", weight=0.5))
    cfg.train.global_batch_size = cfg.train.micro_batch_size = 4
    batch = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1).next_step(1)[0]
    assert batch.examples["sft"] > 0 and batch.examples["chat"] > 0
    assert max(len(row) for row in batch.row_lengths) > 1  # packed


TOKENIZED_BAD_ROWS = [
    ({"input_ids": []}, 'empty field "input_ids"'),
    ({"input_ids": "5 6"}, 'field "input_ids" must be list, got str'),
    ({"input_ids": [5, "6"]}, "input_ids[1] must be an integer, got str '6'"),
    ({"input_ids": [5, True]}, "input_ids[1] must be an integer, got bool True"),
    ({"input_ids": [5, 320]}, "input_ids[1] is 320, outside the tokenizer's vocabulary [0, 320)"),
    ({"input_ids": [-1, 5]}, "input_ids[0] is -1, outside the tokenizer's vocabulary"),
    ({"input_ids": [5, 6], "labels": [5]}, 'field "labels" has 1 entries, "input_ids" has 2'),
    ({"input_ids": [5, 6], "labels": [-100, 7]}, "labels[1] is 7: a label is the token id at its position (6) or -100"),
    ({"input_ids": [5, 6], "labels": [-100, 6.0]}, "labels[1] must be an integer, got float 6.0"),
    ({"input_ids": [5, 6], "labels": [5, -100]}, "no target tokens: every label after the first is -100"),
]


@pytest.mark.parametrize("bad,message", TOKENIZED_BAD_ROWS, ids=[m for _, m in TOKENIZED_BAD_ROWS])
def test_bad_tokenized_row_is_named_by_file_and_line(tmp_path, tiny_tokenizer, bad, message):
    cfg, path = tokenized_config(tmp_path, tiny_tokenizer, [{"input_ids": [5, 6, 7]}, bad])
    with pytest.raises(DataError) as err:
        build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    assert str(err.value).startswith(f"{path}:2: {message}"), str(err.value)


def test_tokenized_data_with_a_trained_tokenizer_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.datasets.0.format: tokenized data needs the tokenizer it was tokenized"):
        plan_run(config(tmp_path, [{"input_ids": [5, 6]}], fmt="tokenized")[0], 1, "cpu")


# --------------------------------------------------------------------------- choice (eval only)

MMLU = {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "math"}
HELLASWAG = {"ctx": "A man is sitting on a roof. He", "endings": ["is using wrap.", "starts pulling up roofing.",
                                                                   "is ripping level tiles.", "holds a rubik's cube."],
             "label": "3"}
ARC = {"question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]},
       "answerKey": "B"}
ARC_NUMERIC = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "water", "snow"],
                                                          "label": ["1", "2", "3", "4"]}, "answerKey": "1"}


@pytest.mark.parametrize("record,fields,expected", [
    (MMLU, {"context": "question"}, ("What is 2 + 2?", ("3", "4", "5", "22"), 1)),
    (HELLASWAG, {"context": "ctx", "choices": "endings", "answer": "label"}, (HELLASWAG["ctx"], tuple(HELLASWAG["endings"]), 3)),
    (ARC, {"context": "question", "choices": "choices.text", "labels": "choices.label", "answer": "answerKey"},
     ("Which is a mammal?", ("shark", "whale", "trout"), 1)),
    # ARC's numeric labels are labels, not indices: "1" is the first choice
    (ARC_NUMERIC, {"context": "question", "choices": "choices.text", "labels": "choices.label", "answer": "answerKey"},
     ("Which is a gas?", ("ice", "steam", "water", "snow"), 0)),
    ({**MMLU, "answer": "C"}, {"context": "question"}, ("What is 2 + 2?", ("3", "4", "5", "22"), 2)),  # a letter
    ({"context": "2 + 2 =", "choices": ["three", "four"], "answer": "four"}, {}, ("2 + 2 =", ("three", "four"), 1)),
    ({**MMLU, "answer": "five"}, {"context": "question"}, None),
], ids=["mmlu", "hellaswag", "arc", "arc-numeric-labels", "letter", "text", "unknown"])
def test_choice_records_of_mmlu_hellaswag_and_arc_shape(record, fields, expected):
    from trainer.data.formats import choice_question
    from trainer.data.records import RowError

    names = field_names("choice", fields, "k")
    if expected is None:
        with pytest.raises(RowError, match="neither the index of a choice, nor one of the labels, a letter or"):
            choice_question(record, names)
        return
    q = choice_question(record, names)
    assert (q.context, q.choices, q.answer) == expected


def test_mmlu_and_arc_shapes_read_without_a_mapping_and_a_missing_field_names_the_mapping():
    from trainer.data.formats import choice_question
    from trainer.data.records import RowError

    names = field_names("choice", {}, "k")
    q = choice_question(MMLU, names)
    assert (q.context, q.choices, q.answer, q.context_from) == ("What is 2 + 2?", ("3", "4", "5", "22"), 1, "question")
    arc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answer": "B"}
    assert choice_question(arc, names).choices == ("ice", "steam") and choice_question(arc, names).answer == 1
    with pytest.raises(RowError) as err:
        choice_question({"choices": ["a", "b"], "answer": 0}, names)
    assert str(err.value) == ('missing field "context" (nor "question"); name the file\'s field of it with fields: '
                              '{context: NAME}')
    with pytest.raises(RowError) as err:
        choice_question({**arc, "answer": None, "answerKey": "B"}, names)
    assert str(err.value) == 'missing field "answer"; name the file\'s field of it with fields: {answer: NAME}'


CHOICE_BAD_ROWS = [
    ({"choices": ["a", "b"], "answer": 0}, 'missing field "context"'),
    ({"context": "c", "choices": ["a"], "answer": 0}, 'field "choices" must be a list of at least 2 non-empty strings'),
    ({"context": "c", "choices": ["a", ""], "answer": 0}, 'field "choices" must be a list of at least 2 non-empty strings'),
    ({"context": "c", "choices": ["a", "b"], "answer": 2}, 'field "answer": 2 is not among the 2 choices'),
    ({"context": "c", "choices": ["a", "b"], "answer": "maybe"}, """field "answer": 'maybe' is neither the index"""),
    ({"context": "c", "choices": ["a", "b"], "answer": 1, "labels": ["A"]}, 'field "labels" must be a list as long'),
]


@pytest.mark.parametrize("bad,message", CHOICE_BAD_ROWS, ids=[m[:40] for _, m in CHOICE_BAD_ROWS])
def test_bad_choice_row_is_named_by_file_and_line(tmp_path, tiny_tokenizer, bad, message):
    """Read as an eval set of a run: the file and line of the bad row, and what is wrong."""
    from trainer.eval.multiple_choice import build_choice_sets

    good = {"context": "Two plus two is", "choices": ["four", "five"], "answer": 0}
    bench = write_jsonl(tmp_path / "bench.jsonl", [good, good, bad])
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "model.config={model_type: llama}",
                             "model.tokenizer=train-bpe", "model.config.vocab_size=320",
                             f"data.datasets=[{{path: {bench}}}]", f"data.cache_dir={tmp_path / 'cache'}",
                             "train.max_steps=1", f"data.eval.sets=[{{path: {bench}, format: choice}}]"])
    with pytest.raises(DataError, match=re.escape(f"{bench}:3: ") + re.escape(message)):
        build_choice_sets(cfg, tiny_tokenizer, "sdpa")
    cfg.data.on_bad_row = "skip"
    assert len(build_choice_sets(cfg, tiny_tokenizer, "sdpa")["bench"].questions) == 2


# ----------------------------------------------------------------------------- tools, tool calls, reasoning

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "reasoning_content": "I should ask the weather tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "name": "get_weather", "content": "22 C and sunny"},
    {"role": "assistant", "content": "It is 22 C and sunny in Paris."},
]}
REASONING = "<think>\nI should ask the weather tool.\n</think>\n\n"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
ANSWER = "It is 22 C and sunny in Paris.<|im_end|>\n"


def chat_examples(tmp_path: Path, tokenizer, rows: list, train_on: list | None = None, **data):
    """The chat data set of `rows` as the loader sees it (train_on: the data set's key)."""
    cfg, path = config(tmp_path, rows, seq_len=1024, **data)
    if train_on is not None:
        cfg.data.datasets[0].train_on = train_on
    return examples_of(cfg, tokenizer), path


def expected_mask(tokenizer, text: str, target_pieces: list[str]) -> list[bool]:
    """By hand: a token is a target when it starts inside one of `target_pieces` (each found in
    `text` in order, after the previous one)."""
    spans, at = [], 0
    for piece in target_pieces:
        start = text.index(piece, at)
        spans.append((start, start + len(piece)))
        at = start + len(piece)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [any(a <= begin < b for a, b in spans) for begin, _ in offsets]


@pytest.mark.parametrize("train_on, pieces", [
    (None, [REASONING + CALL, ANSWER]),
    (["content", "tool_calls"], [CALL, ANSWER]),
    (["content", "reasoning"], [REASONING, "<|im_end|>\n", ANSWER]),
], ids=["default", "no-reasoning", "no-tool-calls"])
def test_three_turn_tool_conversation_has_the_hand_built_mask(tmp_path, tiny_tokenizer, train_on, pieces):
    """user -> assistant (reasoning + tool call) -> tool result -> assistant answer, with the
    tools offered: the tool call's tokens (and by default the reasoning's) are targets, the
    tool result's never; the mask equals one built by hand from the rendered text."""
    tokenizer = tiny_tokenizer
    ds, _ = chat_examples(tmp_path, tokenizer, [TOOL_CHAT], train_on)
    tokens, targets = ds.data.example_tokens(0).tolist(), ds.data.example_targets(0).tolist()
    text = tokenizer.decode(tokens)
    assert text == tokenizer.apply_chat_template(TOOL_CHAT["messages"], tools=TOOL_CHAT["tools"], tokenize=False)
    assert "<tools>\n" + json.dumps(WEATHER) in text  # the tools are offered in the system turn
    assert targets == expected_mask(tokenizer, text, pieces)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    result = text.index("22 C and sunny<|im_end|>")
    tool_tokens = [i for i, (begin, _) in enumerate(offsets) if result <= begin < result + len("22 C and sunny<|im_end|>")]
    assert tool_tokens and not any(targets[i] for i in tool_tokens)
    call = text.index('"get_weather", "arguments"')
    call_targets = [targets[i] for i, (begin, _) in enumerate(offsets) if call <= begin < call + 20]
    assert all(call_targets) if train_on is None or "tool_calls" in train_on else not any(call_targets)


def test_tool_results_never_train_even_with_train_on_prompt(tmp_path, tiny_tokenizer):
    ds, _ = chat_examples(tmp_path, tiny_tokenizer, [TOOL_CHAT], train_on_prompt=True)
    tokens, targets = ds.data.example_tokens(0).tolist(), ds.data.example_targets(0)
    text = tiny_tokenizer.decode(tokens)
    tool_turn = "<|im_start|>tool\n22 C and sunny<|im_end|>\n"
    start = text.index(tool_turn)
    everything_else = [start, start + len(tool_turn)]
    offsets = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert targets.tolist() == [not (everything_else[0] <= begin < everything_else[1]) for begin, _ in offsets]


def test_openai_string_arguments_and_field_names_are_read(tmp_path, tiny_tokenizer):
    """Arguments as a JSON string (OpenAI's API) equal the object; reasoning under another
    field name is mapped per data set."""
    row = json.loads(json.dumps(TOOL_CHAT))
    row["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    row["messages"][1]["thinking"] = row["messages"][1].pop("reasoning_content")
    mapped, _ = chat_examples(tmp_path, tiny_tokenizer, [row], fields={"reasoning": "thinking"})
    plain, _ = chat_examples(tmp_path / "plain", tiny_tokenizer, [TOOL_CHAT])
    assert np.array_equal(mapped.data.tokens, plain.data.tokens)
    assert np.array_equal(mapped.data.targets, plain.data.targets)


def _with(turn: int, **changes) -> dict:
    row = json.loads(json.dumps(TOOL_CHAT))
    row["messages"][turn].update(changes)
    return {k: v for k, v in row.items()}


TOOL_BAD_ROWS = [
    ({**TOOL_CHAT, "tools": [{"description": "no name"}]},
     'tools[0] must be {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'),
    ({**TOOL_CHAT, "tools": "get_weather"}, 'field "tools" must be list, got str'),
    (_with(0, tool_calls=[{"function": {"name": "x", "arguments": {}}}]),
     'turn 0: field "tool_calls" on a user turn; only assistant turns have tool_calls'),
    (_with(1, tool_calls=[{"function": {"arguments": {}}}]), "turn 1: tool_calls[0] must be {\"type\": \"function\""),
    (_with(1, tool_calls=[{"function": {"name": "get_weather", "arguments": "{city: Paris"}}]),
     "turn 1: tool_calls[0].function.arguments is not valid JSON: '{city: Paris'"),
    (_with(1, tool_calls=[{"function": {"name": "get_weather", "arguments": [1]}}]),
     "turn 1: tool_calls[0].function.arguments must be an object, got [1]"),
    (_with(1, tool_calls=None, reasoning_content=None), 'turn 1: missing field "content"'),
    (_with(1, tool_calls=None), "turn 1: assistant turn with neither content nor tool_calls"),
    (_with(1, tool_calls=None, content="Let me see."), "turn 2: a tool result must follow an assistant turn with "
                                                        "tool_calls"),
    (_with(2, content=None), 'turn 2: missing field "content"'),
    (_with(0, reasoning_content="hmm"), 'turn 0: field "reasoning_content" on a user turn; only assistant turns '
                                        'have reasoning'),
]


@pytest.mark.parametrize("bad, message", TOOL_BAD_ROWS, ids=[m[:40] for _, m in TOOL_BAD_ROWS])
def test_bad_tool_shapes_are_named_by_file_and_line(tmp_path, tiny_tokenizer, bad, message):
    cfg, path = config(tmp_path, [TOOL_CHAT, CHAT, bad], seq_len=1024)
    with pytest.raises(DataError) as err:
        build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    assert str(err.value).startswith(f"{path}:3: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_a_template_that_drops_tool_calls_is_caught(tmp_path, tiny_tokenizer):
    """A plain ChatML template (content only) would train on tool rows without their calls."""
    content_only = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                    "{% endif %}")
    encoder = ChatEncoder(tiny_tokenizer, field_names("chat", {}, "fields"), train_on_prompt=False)
    original = tiny_tokenizer.chat_template
    try:
        tiny_tokenizer.chat_template = content_only
        with pytest.raises(ValueError, match=r"the chat template does not render the tools \(tool 0 'get_weather' "
                                             r"is missing\); use a template that does \(model.chat_template: finetrain"):
            encoder.encode(TOOL_CHAT)
        with pytest.raises(ValueError, match="does not render tool_calls"):
            encoder.encode({"messages": TOOL_CHAT["messages"]})
        encoder.encode(CHAT)  # rows without tools are fine with it
    finally:
        tiny_tokenizer.chat_template = original


@pytest.mark.parametrize("train_on, message", [
    (["content", "thoughts"], "data.datasets.0.train_on: 'thoughts' is not a part of an assistant turn; one of "
                              "content, reasoning, tool_calls (tool results never train)"),
    ([], "data.datasets.0.train_on: a non-empty list of content, reasoning, tool_calls, got []"),
])
def test_wrong_train_on_names_the_key(tmp_path, train_on, message):
    path = write_jsonl(tmp_path / "sft.jsonl", [TOOL_CHAT])
    raw = {"model": {"config": dict(TINY_LLAMA), "tokenizer": "train-bpe"}, "train": {"max_steps": 1},
           "data": {"datasets": [{"path": str(path), "format": "chat", "train_on": train_on}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        plan_run(load_config(tmp_path / "c.yaml"), 1, "cpu")
    assert str(err.value) == message
