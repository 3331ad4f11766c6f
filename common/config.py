"""Typed configuration: YAML files -> nested dataclasses, `key.sub=value` overrides.

Every component owns a small dataclass (torchtitan style); an entry point composes them into one
root dataclass. Loading is strict: an unknown key or a value of the wrong type is an error that
names the key, so a typo in a YAML file or on the command line never silently does nothing.
The resolved config (defaults + file + overrides) is saved next to every run and checkpoint with
`save_config`, and `config_from_dict` rebuilds it (eval uses this to rebuild the model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.cli import UserError
from common.io import atomic_write_text

T = TypeVar("T")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# A config (file or override value) holds a few hundred values; YAML aliases can make a short text
# stand for billions (`&a [x,x] ... &b [*a,*a] ...`), which the schema check would walk and print.
MAX_CONFIG_VALUES = 10_000


class ConfigError(UserError, ValueError):
    """A config file or override does not match the dataclass schema (a user error: one line, exit 2)."""


def checked(default: Any, domain: str, test: Callable[[Any], bool]) -> Any:
    """A dataclass field with its range check declared beside it: `epochs: int = checked(50, ">= 1",
    lambda v: v >= 1)`. `check_fields` reads it; the message says `<section>.<key>=<value> must be
    <domain>`."""
    return dataclasses.field(default=default, metadata={"check": (test, domain)})


def at_least(low: int | float, default: Any, note: str = "") -> Any:
    """`checked` for the commonest domain, `>= low` (`note` explains what `low` means, e.g. 0 = off)."""
    return checked(default, f">= {low}{note}", lambda v: v >= low)


def one_of(default: Any, choices: tuple) -> Any:
    """`checked` for a value from a fixed tuple of names (a `str` field whose choices a module lists)."""
    return checked(default, f"one of {choices}", lambda v: v in choices)


@functools.cache
def _declared_checks(cls: type) -> dict[str, tuple[Callable[[Any], bool], str]]:
    """field name -> (test, domain) of dataclass `cls`: its `checked` metadata, or for a `Literal[...]`
    annotation, membership in the literal's values (the annotation is the declaration)."""
    hints = typing.get_type_hints(cls)
    rules = {}
    for f in dataclasses.fields(cls):
        if "check" in f.metadata:
            rules[f.name] = f.metadata["check"]
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            allowed = typing.get_args(hints[f.name])
            rules[f.name] = (lambda v, allowed=allowed: v in allowed, f"one of {list(allowed)}")
    return rules


def check_field(cls: type, name: str, value: Any, section: str) -> None:
    """ConfigError if `value` is outside the domain field `name` of dataclass `cls` declares: the check
    for a function that takes one such value as a plain argument (no config object at hand)."""
    rule = _declared_checks(cls).get(name)
    if rule is not None and value is not None and not rule[0](value):
        raise ConfigError(f"{section}.{name}={value!r} must be {rule[1]}")


def check_fields(cfg: Any, section: str, finite: bool = True) -> None:
    """ConfigError naming the first field of dataclass `cfg` outside the domain its `checked` metadata
    (or `Literal` annotation) declares, or (`finite`) holding a non-finite float; the one validator of
    every section's ranges."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{section}.{f.name}"
        values = value if isinstance(value, (tuple, list)) else (value,)
        if finite and any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key}={value} must be a finite number")
        check_field(type(cfg), f.name, value, section)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to annotation `tp`; raise ConfigError naming `key` if impossible."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)} for value {value!r}")


def _from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or cls.__name__
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key)
    return cls(**kwargs)


def config_from_dict(cls: type[T], data: dict | None) -> T:
    """Build dataclass `cls` from a (possibly partial) nested dict; missing keys keep defaults."""
    return _from_dict(cls, data or {})


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def check_size(data: Any, where: str) -> None:
    """ConfigError if `data` counts more than MAX_CONFIG_VALUES keys and values, each alias counted
    again (the walk stops there, so an exponential structure costs nothing)."""
    count, stack = 0, [data]
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{where} holds more than {MAX_CONFIG_VALUES} values (YAML aliases expanding?); a config is far smaller"
            )
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=2e-4` -> (['train', 'lr'], 2e-4); the value is parsed as YAML (so 1e-3, true, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    check_size(value, f"override {key}=...")
    # YAML 1.1 reads 2e-4 as a string (no dot before the exponent); accept it as a float.
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        value = float(value)
    return path, value


def layered_overrides(*layers: list[str]) -> list[str]:
    """One command line from layers of `key=value` strings, general to specific: a later layer's key
    replaces an earlier layer's (a bench recipe's evaluation overrides, then one run's own epochs).
    A key twice within one layer stays an error, as on a command line (apply_overrides)."""
    merged: dict[tuple[str, ...], str] = {}
    for layer in layers:
        seen: set[tuple[str, ...]] = set()
        for text in layer:
            key = tuple(parse_override(text)[0])
            if key in seen:
                raise ConfigError(f"{'.'.join(key)} is given twice in {list(layer)}; give it once")
            seen.add(key)
            merged.pop(key, None)  # re-inserted last: the order a reader expects
            merged[key] = text
    return list(merged.values())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge `key.sub=value` strings into a nested dict (in place, returned).

    A key given twice is an error naming it: letting the last one win once turned a shell's
    brace-expanded `data.shards=...{000000..000099}.tar` into a run over the last shard alone."""
    given: dict[tuple[str, ...], str] = {}
    for text in overrides:
        path, value = parse_override(text)
        if tuple(path) in given:
            key = ".".join(path)
            raise ConfigError(
                f"{key} is given twice on the command line ({given[tuple(path)]!r} and {text!r}); give it once"
            )
        given[tuple(path)] = text
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def deep_merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v
    return base


class _NoDuplicateKeysLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently, so `lr: 1e-3` ... `lr: 2e-4` further down a section would quietly override."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)):  # keys of a config; others are left to the schema
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: `line N, column M: problem` (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping; every error names the file (and line)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a config file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {path}")
    try:
        with path.open("r", encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_NoDuplicateKeysLoader)  # safe: a SafeLoader subclass
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:  # syntax errors and python/object tags (safe_load refuses them)
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None
    if data is None:
        # An empty file is far more often a truncated copy or the wrong path than a wish for defaults.
        raise ConfigError(f"{path} is empty; a config file needs at least one key")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got a {type(data).__name__}")
    check_size(data, str(path))
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls` <- YAML file <- overrides, strictly type-checked."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides or []))
    return config_from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
