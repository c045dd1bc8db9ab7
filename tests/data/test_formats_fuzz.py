"""Every data format's rows, fuzzed (Hypothesis): records of the right shape and of every wrong one
(missing fields, wrong JSON types, empty and huge strings, lone surrogates, NaN and infinities,
huge integers, deeply nested values) and lines that are no JSON or no UTF-8, written as JSON Lines
and as a JSON array, then read and encoded by the real code (trainer/data/sources.py, the encoders
of trainer/data/formats.py and chat.py, the tokenizer's texts, choice questions). Each row is an
example, or a problem of one line that trainer/data/prepare.py reports with its file and line (or
skips with data.on_bad_row=skip); nothing else is raised.

Cases: FORMAT_CASES per format (6 formats) and RAW_CASES of raw lines, seeded (derandomized);
FINETRAIN_FUZZ=long runs many more with fresh seeds (tests/conftest.py)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import fuzz_settings
from trainer.data.formats import build_encoder, choice_question, record_texts
from trainer.data.prepare import encode_chunk
from trainer.data.records import DEFAULT_FIELDS, RowError
from trainer.data.sources import Row, location, read_rows
from trainer.runtime.errors import DataError

FORMAT_CASES = 200
RAW_CASES = 300
TRAIN_FORMATS = ("chat", "instruction", "text", "classification", "tokenized")

_file_number = itertools.count()

# JSON values of every kind, nested up to a few levels (deeper nesting is drawn apart below).
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.integers(-5, 400),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", " ", "\n", "user", "assistant", "system",
                                                                     "tool", "human", "gpt", "A", "1", "-1"]),
    st.text(max_size=30), st.text(min_size=2000, max_size=5000, alphabet="ab \n"),
    st.sampled_from(["\ud800", "x\udfffy", "\ud83d\ude00 pair"]),  # lone surrogates, and a valid pair
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)


DEEP = "\x00deep:{}\x00"  # stands for a value nested that deep, spliced into the JSON text (too deep for json.dumps)


def as_json(value) -> bytes:
    text = json.dumps(value)  # lone surrogates as \ud800 escapes
    for depth in (50, 5000):
        text = text.replace(json.dumps(DEEP.format(depth)), "[" * depth + '"x"' + "]" * depth)
    return text.encode()


@st.composite
def records(draw, fmt: str):
    """A record with (some of) the format's fields, each a value of the right shape or not."""
    names = DEFAULT_FIELDS[fmt]
    record = {}
    for key, name in names.items():
        if draw(st.booleans()):
            record[name] = draw(shaped(fmt, key) | values)
    if draw(st.integers(0, 9)) == 0:
        record[draw(st.sampled_from(list(names.values())))] = DEEP.format(draw(st.sampled_from([50, 5000])))
    return record


def shaped(fmt: str, key: str):
    """Values of the shape a field takes, so that encoding gets past the type checks."""
    text = st.text(max_size=40) | st.sampled_from(["", "\ud800", "hello world"])
    if key == "messages":
        turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "gpt", "x"]),
                                      "content": text | values},
                                     optional={"tool_calls": values, "reasoning_content": text})
        return st.lists(turn, max_size=5)
    if key in ("input_ids", "labels"):
        return st.lists(st.integers(-101, 400) | st.sampled_from([-100, 2**64, True]), max_size=20)
    if key == "choices":
        return st.lists(text, max_size=5)
    if key in ("answer", "label"):
        return st.integers(-2, 6) | st.sampled_from(["A", "b", "2", "pos", ""])
    if key == "tools":
        return st.lists(values, max_size=2)
    return text


def write(folder, name: str, lines: list[bytes]):
    path = folder / f"{next(_file_number)}-{name}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def assert_one_line(problem: str) -> None:
    assert isinstance(problem, str) and problem.strip() and "\n" not in problem, repr(problem)
    problem.encode("utf-8")  # printable as it is


def read_all(path) -> list[Row]:
    """Every row of the file, or a DataError of one line (a whole .json file that cannot be read)."""
    try:
        return list(read_rows(path))
    except DataError as err:
        assert_one_line(str(err))
        return []


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def encoders(tiny_tokenizer):
    return {fmt: build_encoder(fmt, tiny_tokenizer, dict(DEFAULT_FIELDS[fmt]), train_on_prompt=False)
            for fmt in TRAIN_FORMATS}


@pytest.mark.parametrize("fmt", [*TRAIN_FORMATS, "choice"])
def test_every_row_of_every_format_is_an_example_or_a_one_line_problem(fmt, folder, encoders):
    names = dict(DEFAULT_FIELDS[fmt])

    @fuzz_settings(FORMAT_CASES)
    @given(rows=st.lists(records(fmt), min_size=1, max_size=4))
    def check(rows):
        lines = [as_json(record) for record in rows]
        for path in (write(folder, "rows.jsonl", lines), write(folder, "rows.json", [as_json(rows)])):
            read = read_all(path)
            for row in read:
                assert (row.record is None) != (row.error is None)
                if row.error is not None:
                    assert_one_line(row.error)
                    continue
                for text in record_texts(fmt, row.record, names):  # what a trained tokenizer reads
                    text.encode("utf-8")
                if fmt == "choice":
                    try:
                        choice_question(row.record, names)
                    except RowError as err:
                        assert_one_line(str(err))
            if fmt != "choice" and read:
                chunk = encode_chunk(encoders[fmt], read)
                for number, problem in chunk.problems:
                    assert_one_line(f"{location(path, number, read[0].by_line)}: {problem}")
                assert len(chunk.problems) + len(chunk.lengths) == len(read)
                assert all(length > 0 for length in chunk.lengths)

    check()


def test_raw_lines_that_are_no_json_or_no_text_are_one_line_problems(folder, encoders):
    """Bytes as they come: invalid UTF-8, cut-off JSON, JSON that is no object, NaN, huge numbers."""
    fragments = st.sampled_from([b"{", b"}", b'"', b"\\", b"\\ud800", b"\xff", b"\xc3", b"NaN", b"Infinity", b"[",
                                 b"]", b":", b",", b"1e999", b"-0", b"null", b'"text"', b'"messages"', b"\x00", b" "])
    line = st.lists(fragments, max_size=12).map(b"".join) | st.binary(max_size=40)

    @fuzz_settings(RAW_CASES)
    @given(lines=st.lists(line, min_size=1, max_size=5))
    def check(lines):
        for suffix in ("rows.jsonl", "rows.json"):
            read = read_all(write(folder, suffix, lines))
            for row in read:
                if row.error is not None:
                    assert_one_line(row.error)
            good = [row for row in read if row.record is not None]
            if good:
                for problem in encode_chunk(encoders["text"], good).problems:
                    assert_one_line(problem[1])

    check()


def test_a_lone_surrogate_is_a_bad_row_named_by_file_and_line(tmp_path, encoders):
    """Regression: a JSON string escaping half a surrogate pair (`"\\ud800"`) decodes to a string
    that is no Unicode text; it was a traceback from the tokenizer. Now it is a bad row: reported
    with its line, or skipped and counted, while a valid pair (an emoji) is text like any other."""
    path = tmp_path / "sft.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 half"}\n{"text": "pair \\ud83d\\ude00 ok"}\n'
                    '[{"text": "\\udc00"}]\n')
    rows = list(read_rows(path))
    assert [row.error for row in rows] == [
        None, "not valid Unicode text (a lone surrogate in the string 'bad \\ud800 half')", None,
        "expected a JSON object, got list"]
    assert rows[2].record == {"text": "pair \U0001F600 ok"}
    chunk = encode_chunk(encoders["text"], rows)
    assert [number for number, _ in chunk.problems] == [2, 4] and len(chunk.lengths) == 2
    array = tmp_path / "sft.json"
    array.write_text(json.dumps([{"text": "ok"}, {"text": "\ud800"}]))
    assert [row.error is None for row in read_rows(array)] == [True, False]
    assert math.isnan(json.loads("NaN"))  # NaN is JSON to Python's reader: the encoders must refuse it as a type


def test_a_conversation_opening_with_the_assistant_or_with_tool_calls_of_no_list_is_handled(tmp_path, encoders):
    """Regressions: a conversation whose first turn is the assistant's made the chat encoder render
    the empty conversation before it, which transformers refuses with a ValueError (a traceback);
    `tool_calls` that is no list (a number) was a TypeError while collecting the tokenizer's texts."""
    names = dict(DEFAULT_FIELDS["chat"])
    opening = {"messages": [{"role": "assistant", "content": "hello"}]}
    encoded = encoders["chat"].encode(opening)
    assert len(encoded.tokens) and encoded.targets[1:].any()
    odd = {"messages": [{"role": "user", "content": "hi", "tool_calls": 5}, {"role": "assistant", "content": "x"}]}
    assert record_texts("chat", odd, names) == ["hi", "x"]
