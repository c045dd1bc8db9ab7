"""Configs, fuzzed (Hypothesis): a valid run's YAML with keys set to values of every type and range,
unknown keys, odd YAML (tabs, anchors, tags, a top level that is no mapping, bytes that are no UTF-8)
and overrides of every shape, through the real `load_config` and the run plan for 1, 2 or 4 ranks.
Each case is a config that plans, or a user's mistake reported as lines `finetrain: FILE:LINE: ...`
(or naming the override) with exit code 2; nothing else is raised.

Cases: CONFIG_CASES and YAML_CASES, seeded (derandomized); FINETRAIN_FUZZ=long runs many more with
fresh seeds (tests/helpers.py)."""

from __future__ import annotations

import dataclasses
import itertools
import re
import typing

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from helpers import causal_config, fuzz_settings
from trainer.config.schema import Config, load_config
from trainer.config.tree import field_key
from trainer.plan import plan_run
from trainer.runtime.errors import UserError, report_user_error

CONFIG_CASES = 1200
YAML_CASES = 500

_number = itertools.count()


def known_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (lists of sections by their first element)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field_key(field.name)}"
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys += known_keys(hint, key + ".")
        else:
            keys.append(key)
            args = typing.get_args(hint)
            if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
                keys += known_keys(args[0], key + ".0.")
    return keys


KEYS = known_keys()
values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["auto", "never", "fsdp", "zero3", "ddp", "single", "bf16", "fp32", "nf4", "lora", "chat",
                     "cosine", "1e-5", "-1", "0", "", "builtin:toy-chat", "/nonexistent", "runs/x", "\ud800"]),
    st.lists(st.integers(-1, 4) | st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=5), max_size=2),
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[dict, object]:
    tmp = tmp_path_factory.mktemp("config-fuzz")
    return causal_config(tmp), tmp


def check(path, overrides: list[str], capsys) -> None:
    """The config loads and plans, or is a user's mistake in lines that name the file or override."""
    try:
        cfg = load_config(path, overrides)
        for world in (1, 2, 4):
            plan_run(cfg, world, "cpu")
    except UserError as err:
        capsys.readouterr()
        assert report_user_error(err, path, overrides) == 2
        lines = capsys.readouterr().err.splitlines()
        assert lines, err
        for line in lines:
            assert line.startswith(f"finetrain: {path}") or "override" in line, (line, str(err))
            problem = re.sub(rf"^finetrain: {re.escape(str(path))}(:\d+)?: ", "", line)
            assert problem.strip() and not problem[0].isspace(), (line, str(err))  # no continued line


def put(tree: dict, key: str, value) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() and int(part) < len(node) else {}
            continue
        child = node.get(part)
        if not isinstance(child, (dict, list)):
            child = node[part] = {}
        node = child
    if isinstance(node, dict):
        node[parts[-1]] = value


def test_configs_with_any_key_set_to_anything_plan_or_name_the_key(base, capsys):
    cfg, tmp = base

    @fuzz_settings(CONFIG_CASES)
    @given(changes=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(min_size=1, max_size=15), values), max_size=4),
           overrides=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=10), st.text(max_size=12)).map(
               lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=12), max_size=2))
    def case(changes, overrides):
        tree = yaml.safe_load(yaml.safe_dump(cfg))
        for key, value in changes:
            put(tree, key, value)
        try:
            text = yaml.safe_dump(tree, allow_unicode=False)
        except yaml.YAMLError:
            return
        path = tmp / f"{next(_number)}.yaml"
        path.write_text(text)
        check(path, overrides, capsys)

    case()


def test_odd_yaml_is_one_line_per_problem_naming_the_file(base, capsys):
    cfg, tmp = base
    valid = yaml.safe_dump(cfg)
    pieces = st.sampled_from([
        "\t", "  ", ":", "- ", "&a ", "*a", "*undefined", "!!python/object:os.system {}", "!!binary x", "{", "}",
        "[", "]", "? ", "'", '"', "\\ud800", "<<: *a", "---\n", "...\n", "%YAML 1.1\n", "optim:\n", "  lr: ",
        "train:\n  max_steps: ", "1e400", ".nan", ".inf", "~", "yes", "0x10", "\n", "run: [1, 2]\n", "data: 5\n",
    ])

    @fuzz_settings(YAML_CASES)
    @given(prefix=st.lists(pieces, max_size=6).map("".join), suffix=st.lists(pieces, max_size=6).map("".join),
           raw=st.binary(max_size=6), cut=st.integers(0, 4000))
    def case(prefix, suffix, raw, cut):
        path = tmp / f"{next(_number)}.yaml"
        path.write_bytes(prefix.encode() + valid[:cut].encode() + suffix.encode() + raw)
        check(path, [], capsys)

    case()


def test_a_config_that_is_no_utf8_or_holds_a_control_character_is_one_line_naming_its_line(tmp_path, capsys):
    """Regressions: bytes that are no UTF-8 in a config were a traceback (UnicodeDecodeError), in
    load_config and again while locating the problem's line; a character YAML does not take (NUL)
    was a problem over two lines without its line number."""
    path = tmp_path / "run.yaml"
    for data, expected in ((b"run:\n  name: caf\xe9\n", "2: not valid UTF-8 (byte 0xe9)"),
                           (b"run:\n\n  name: a\x00\n", "3: not valid YAML (unacceptable character #x0000: special "
                                                          "characters are not allowed)")):
        path.write_bytes(data)
        with pytest.raises(UserError) as raised:
            load_config(path)
        assert report_user_error(raised.value, path) == 2
        assert capsys.readouterr().err == f"finetrain: {path}:{expected}\n"


def test_an_override_with_a_control_character_or_a_line_break_is_one_line(tmp_path, capsys):
    """Regressions: an override whose value YAML cannot read (a control character) was a traceback
    (yaml's ReaderError); one holding a line break (or any separator str.splitlines knows) printed
    its problem over several lines."""
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  name: x\n")
    for override, expected in (("run.name=a\x01", r"override 'run\.name=a\\x01': the value is not valid YAML \(unacceptable character #x0001: special characters are not allowed\)$"),
                               ("run.name=[\u2028]", r"run\.name: expected a string, got .*\(override run\.name=\[\\u2028\]\)$")):
        with pytest.raises(UserError) as raised:
            load_config(path, [override])
        report_user_error(raised.value, path, [override])
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and re.search(expected, lines[0].removeprefix("finetrain: ")), lines
