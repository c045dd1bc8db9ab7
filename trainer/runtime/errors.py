"""A user's mistake, and how it reaches the user: one line per problem, exit code 2.

A `UserError` is a mistake in what the user gave finetrain (config, data, files, launch
layout), not a bug of finetrain's. Every entry point (each rank, `finetrain train`,
`prepare`, `export`, `estimate`, `submit`) reports it through `report_user_error`: one line
`finetrain: ...` per problem, pointing at the config line of the key where there is one,
exit code 2, no traceback (FINETRAIN_TRACEBACK=1 shows it). A mistake every rank agreed on
is printed by rank 0 alone.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path

import yaml


class UserError(ValueError):
    """A mistake in what the user gave finetrain (config, data, files, launch layout), not a
    bug of finetrain's: reported as one line `finetrain: ...` with exit code 2 on every rank
    and from every launcher, never as a traceback (FINETRAIN_TRACEBACK=1 shows it)."""

    exit_code = 2


class ConfigError(UserError):
    """A config that cannot run; one line per problem, each starting with the offending key."""


class DataError(UserError):
    """Bad input data; the message starts with the file and line or row."""


def report_user_error(err: UserError, config: str | os.PathLike | None = None, overrides: list[str] = ()) -> int:
    """Print a user's mistake as one line per problem (`finetrain: file:line: what`) and
    return its exit code. An error every rank agreed on is printed by rank 0 alone."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if getattr(err, "agreed", False) and rank != "0":
        return err.exit_code
    if os.environ.get("FINETRAIN_TRACEBACK") == "1":
        traceback.print_exception(err, file=sys.stderr)
    for line in user_error_lines(err, config, overrides):
        say(line)
    return err.exit_code


def user_error_lines(err: UserError, config: str | os.PathLike | None = None, overrides: list[str] = ()) -> list[str]:
    """The lines that report a user's mistake (a config problem located at its key's line)."""
    if isinstance(err, ConfigError):
        return locate_problems(str(err), config, overrides)
    return [line for line in str(err).splitlines() if line.strip()]


_console = None  # the terminal, where a launcher sent this rank's stdout and stderr to a log file


def set_console(stream) -> None:
    global _console
    _console = stream


def say(line: str) -> None:
    """A one-line report `finetrain: line` on stderr, and on the terminal too where a launcher sent
    this rank's stderr to its log file (trainer/runtime/faults.py)."""
    # One line, printable whatever it quotes: a line break, or a lone surrogate (a file name or
    # argument that is no UTF-8 reaches Python so) that the UTF-8 stream would refuse to write.
    line = one_line(line).encode("utf-8", "backslashreplace").decode("utf-8")
    print(f"finetrain: {line}", file=sys.stderr, flush=True)
    if _console is not None:
        print(f"finetrain: {line}", file=_console, flush=True)


_LEADING_KEY = re.compile(r"^(?:unknown key )?([A-Za-z_]\w*(?:\.\w+)*)(?=[:;, ]|$)")


def key_lines(path: str | os.PathLike) -> dict[str, int]:
    """The line of every dotted key written in a YAML config (`data.datasets.0.path` -> 14)."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return {}
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}{key.value}"
                lines[dotted] = key.start_mark.line + 1
                walk(value, dotted + ".")
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[f"{prefix}{index}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{index}.")

    walk(root, "")
    return lines


def locate_problems(message: str, config: str | os.PathLike | None, overrides: list[str] = ()) -> list[str]:
    """Each problem of a ConfigError as `config:line: problem`, pointing at the line where its
    key (or the nearest enclosing section) is written, or naming the override that set it."""
    given = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        given[key] = item
    lines = key_lines(config) if config is not None else {}
    located = []
    for problem in message.splitlines():
        if not problem.strip():
            continue
        match = _LEADING_KEY.match(problem)
        key = match.group(1) if match else None
        if config is None or str(problem).startswith(str(config)):
            located.append(problem)
        elif key is not None and key in given:
            located.append(f"{problem} (override {one_line(given[key])})")
        else:
            parts = key.split(".") if key else []
            line = next((lines[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in lines), None)
            located.append(f"{config}:{line}: {problem}" if line else f"{config}: {problem}")
    return located


def decode_utf8(data: bytes, path, error: type[UserError]) -> str:
    """`data` (the file `path`) as text, or `error` naming the line of the first byte that is no UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x})") from None


def one_line(text: str) -> str:
    """`text` as one line: a value the user gave may hold line breaks (any that str.splitlines
    knows), and a problem is one line."""
    return _LINE_BREAKS.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


_LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def first_line(err: BaseException) -> str:
    """The gist of a library's exception, for a one-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
