"""Nested mappings (what YAML reads) into a tree of dataclasses, and dotted `key=value`
overrides onto such mappings: each value coerced to its field's type hint, each field's own
`rule` checked, every mistake collected as one line that names the key (with a close match for
a misspelt key or choice). trainer/config/schema.py declares the tree; nothing here knows its keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import types
import typing
from dataclasses import field
from typing import Any, Callable, Literal, Union

import yaml

from trainer.runtime.errors import ConfigError


def rule(default: Any, check: Callable[[Any], bool], text: str, files: bool = False,
         factory: Callable[[], Any] | None = None) -> Any:
    """A field whose given value must pass `check` (None means "not set"). `files` rules look at
    the file system and are skipped when a config is read away from its data (export, estimate)."""
    default_arg = {"default_factory": factory} if factory else {"default": default}
    return field(metadata={"check": check, "text": text, "files": files}, **default_arg)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-5)")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    try:
        return key, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        problem = str(getattr(err, "problem", None) or err).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None


def apply_override(raw: dict, item: str) -> None:
    key, value = parse_override(item)
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_index(node, part, ".".join(parts[: depth + 1]))
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
        node = child
    if isinstance(node, list):
        idx = _list_index(node, parts[-1], key)
        node[idx] = value
    else:
        node[parts[-1]] = value


def _list_index(node: list, part: str, key: str):
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key {key}: {part!r} is not an index of a list of {len(node)}")
    return node[int(part)] if isinstance(node[int(part)], (dict, list)) else int(part)


def build(cls, raw: Any, prefix: str, errors: list[str], check_files: bool = True):
    """Turn a nested dict into the dataclass `cls`, collecting errors rather than stopping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    declared = {f.name: f for f in dataclasses.fields(cls)}
    fields = {field_key(name): name for name in declared}
    names = list(fields)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            errors.append(f"unknown key {full}{hint}")
            continue
        name, mistyped = fields[key], len(errors)
        kwargs[name] = _coerce(hints[name], value, full, errors, check_files)
        meta = declared[name].metadata
        if "check" in meta and kwargs[name] is not None and len(errors) == mistyped and (check_files or not meta["files"]):
            if not meta["check"](kwargs[name]):
                given = kwargs[name]
                errors.append(f"{full}: {given} {meta['text']}" if meta["files"] else f"{full}: {meta['text']}, got {given}")
    return cls(**kwargs)


def field_key(field_name: str) -> str:
    """The config key of a dataclass field: a key that is a Python keyword (`async`) lives in
    the field of that name with an underscore (`async_`)."""
    bare = field_name.rstrip("_")
    return bare if bare != field_name and keyword.iskeyword(bare) else field_name


def _coerce(hint, value, key: str, errors: list[str], check_files: bool = True):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".", errors, check_files)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            trial: list[str] = []
            result = _coerce(option, value, key, trial)
            if not trial:
                return result
        errors.append(f"{key}: expected {_describe(hint)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean {close[0]}?)" if close else ""
            errors.append(f"{key}: {value!r} is not one of {', '.join(map(str, args))}{hint_text}")
        return value
    if hint is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint in _SCALARS:
        accepts, convert, what = _SCALARS[hint]
        if accepts(value):
            return convert(value)
        errors.append(f"{key}: expected {what}, got {value!r}")
        return value
    for container, what in ((list, "a list"), (dict, "a mapping")):
        if hint is container or origin is container:
            if not isinstance(value, container):
                errors.append(f"{key}: expected {what}, got {value!r}")
                return container()
    if origin is list and args and dataclasses.is_dataclass(args[0]):  # e.g. list[DatasetConfig]
        return [build(args[0], item, f"{key}.{i}.", errors, check_files) for i, item in enumerate(value)]
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# type -> (accepts the YAML value, converts it, what the message says is expected)
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), bool, "true or false"),
    int: (lambda v: _is_number(v) and isinstance(v, int), int, "an integer"),
    float: (_is_number, float, "a number"),
    str: (lambda v: isinstance(v, str) or _is_number(v), str, "a string"),
}


def _describe(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)
