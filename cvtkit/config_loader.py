"""YAML configs validated against typed dataclasses, with `--set key=value` overrides.

    cfg = load_config(RunConfig, "configs/pretrain/cvt_13_224_in1k.yaml", ["optim.lr=1e-3"])

Every problem is one `ConfigError` naming the file (or `--set`) and the dotted key: an unknown key
(with the allowed ones), a missing required key, a wrong type, or an impossible value. Sections
check their own values in `__post_init__` by raising `ValueError("key: what was expected")`;
the loader prefixes the section's path. Nothing is started before the whole config is valid.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from cvtkit.errors import CvtkitError

T = TypeVar("T")


class ConfigError(CvtkitError, ValueError):
    """An invalid config; the message is one line naming the source and the key."""


def require(condition: bool, key: str, expected: str, value: Any) -> None:
    """For `__post_init__` checks: `require(self.lr > 0, "lr", "a positive number", self.lr)`."""
    if not condition:
        raise ValueError(f"{key}: expected {expected}, got {value!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


class _Invalid(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = _Invalid(key, f"expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise wrong
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except _Invalid:
                continue
        raise wrong
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Invalid(key, f"expected {len(args)} items, got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise wrong
        vt = args[1] if args else Any
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `1e-3` (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        raise wrong
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise wrong
    return value


def _build(schema: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    for key in data:
        if key not in fields:
            raise _Invalid(prefix + str(key), f"unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(prefix + name, f"missing required key ({_type_name(hints[name])})")
    try:
        return schema(**kwargs)
    except ValueError as e:
        # `__post_init__` reports "key: problem"; name the key with its section.
        name, sep, rest = str(e).partition(": ")
        if sep and name in fields:
            raise _Invalid(prefix + name, rest) from None
        raise _Invalid(prefix.rstrip(".") or "(top level)", str(e)) from None


def parse_overrides(items: Sequence[str]) -> dict:
    """`["optim.lr=1e-3", "model.name=cvt_13"]` -> `{"optim": {"lr": 0.001}, "model": {...}}`.

    Values are read as YAML, so `true`, `[1, 2]` and `null` work. A mapping value replaces the
    section it names (`model.options={depth: 3}` drops the file's other options), while dotted keys
    change one key each (`model.options.depth=3` keeps them)."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=1e-3")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set both as a value and a section")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node[parts[-1]] = _Replace(value) if isinstance(value, dict) else value
    return tree


class _Replace(dict):
    """A mapping given whole on the command line: it replaces, not merges into, the file's section."""


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        merge = isinstance(v, dict) and not isinstance(v, _Replace) and isinstance(out.get(k), dict)
        out[k] = _merge(out[k], v) if merge else (dict(v) if isinstance(v, _Replace) else v)
    return out


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= _keys(v, prefix + k + ".")
    return keys


def load_config(schema: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Read `path` (YAML), apply `overrides`, and validate the result against `schema`."""
    source = str(path) if path is not None else "<defaults>"
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    extra = parse_overrides(overrides)
    from_cli = _keys(extra)
    try:
        return _build(schema, _merge(data, extra))
    except _Invalid as e:
        from_set = any(e.key == k or e.key.startswith(k + ".") for k in from_cli)
        raise ConfigError(f"{'--set' if from_set else source}: {e.key}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) that `load_config` reads back to an equal config."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--config FILE` and `--set key=value ...` (repeatable) for the entry points."""
    parser.add_argument("--config", required=required, help="recipe YAML, e.g. configs/pretrain/...")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override config keys, e.g. --set optim.lr=1e-3")
