"""The config reference, docs/config.md, rendered from the schema itself.

One section per top-level key of `Config`, one row per key: its dotted name, its type, its
default and its text, which is the comment written above the field in
trainer/config/schema.py (and any comment at the end of the field's line), then the rule the
key is checked against on its own (`rule`, trainer/config/tree.py). So a key is documented
where it is declared, and `python -m trainer.config.reference > docs/config.md` (`make docs`)
renders the page; tests/config/test_reference.py fails when the page and the schema differ.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import tokenize
import types
import typing
from typing import Literal, Union

from trainer.config import schema
from trainer.config.tree import field_key

INTRO = """\
# Config reference

<!-- Generated from trainer/config/schema.py by `make docs`; edit the schema's comments, not this page. -->

A run is one YAML file of these sections; every key has a default except the model
(`model.path` or `model.config`) and the data (`data.datasets`). A key given on the command line
as a dotted override (`optim.lr=1e-5 parallel.strategy=fsdp data.datasets.0.weight=0.9`) wins
over the file; list items are numbered from 0 (`N` below). A wrong key, type or value stops at
start-up with one line naming the key and what it accepts (exit code 2). Each key's own rule is
listed with it; rules that relate several keys are the run plan's (trainer/plan.py), which
`finetrain train` checks for the world it is about to launch before any rank starts. Batch
sizes count rows: padded examples, or packed rows of up to `data.seq_len` tokens.
"""


def field_comments(module) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment lines directly above the field, then any comment
    at the end of the field's own lines, joined into one text."""
    source = inspect.getsource(module)
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, the comment is the whole line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            whole_line = not token.line[: token.start[1]].strip()
            comments[token.start[0]] = (token.string.lstrip("#").strip(), whole_line)
    texts = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in comments and comments[line][1]:
                above.insert(0, comments[line][0])
                line -= 1
            after = [comments[n][0] for n in range(stmt.lineno, stmt.end_lineno + 1)
                     if n in comments and not comments[n][1]]
            texts[(node.name, stmt.target.id)] = " ".join(sentence(" ".join(part)) for part in (above, after) if part)
    return texts


def sentence(text: str) -> str:
    return text if text.endswith(".") else text + "."


def list_item(hint):
    """The dataclass of a list of sections (e.g. `list[DatasetConfig]`), else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def type_text(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of: " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(arg) for arg in args)
    if dataclasses.is_dataclass(hint):
        return "section: the keys below"
    if list_item(hint):
        return "list of sections: each item the keys below"
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string",
             list: "list", dict: "mapping"}
    return names.get(origin or hint, str(hint))


def value_text(value) -> str:
    """A default as YAML writes it in flow style."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, list):
        return "[" + ", ".join(map(value_text, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {value_text(item)}" for key, item in value.items()) + "}"
    return repr(value)


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    else:
        value = f.default_factory()
    return "see below" if dataclasses.is_dataclass(value) else f"`{value_text(value)}`"


def rule_text(f: dataclasses.Field) -> str:
    if "text" not in f.metadata:
        return ""
    if f.metadata["files"]:
        return f"Refused when it {f.metadata['text']}."
    return f"Rule: {f.metadata['text']}."


def rows(cls, prefix: str, comments: dict):
    """(key, type, default, text) of every key of the section `cls`, nested sections after their key."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = prefix + field_key(f.name), hints[f.name]
        text = " ".join(part for part in (comments.get((cls.__name__, f.name), ""), rule_text(f)) if part)
        yield key, type_text(hint), default_text(f), text
        if dataclasses.is_dataclass(hint):
            yield from rows(hint, key + ".", comments)
        elif list_item(hint):
            yield from rows(list_item(hint), key + ".N.", comments)


def cell(text: str) -> str:
    """A table cell: `|` and tag-like `<` escaped, the other docs pages named in it linked."""
    text = re.sub(r"<(?=[A-Za-z/])", r"\\<", text.replace("|", "\\|"))
    return re.sub(r"docs/([a-z-]+)\.md", r"[\1](\1.md)", text)


def render_reference() -> str:
    comments = field_comments(schema)
    sections = [f.name for f in dataclasses.fields(schema.Config)]
    hints = typing.get_type_hints(schema.Config)
    lines = [INTRO, "Sections: " + ", ".join(f"[{name}](#{name})" for name in sections) + ".", ""]
    for name in sections:
        lines += [f"## {name}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, type_, default, text in rows(hints[name], name + ".", comments):
            lines.append(f"| `{key}` | {cell(type_)} | {cell(default)} | {cell(text)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_reference(), end="")
