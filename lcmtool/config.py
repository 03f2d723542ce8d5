"""Typed command configs: dataclass defaults < YAML file (--config) < flags < --set dotted.key=value.

Each option is declared once, as a dataclass field made by `opt(default, help)`: cli.py derives the command's
Typer options from these fields (a field without help is a config key only). Unknown keys, values of the wrong
type, non-finite floats (unless a field says `finite=False`) and values outside a field's bounds
(`opt(..., min=, max=)` inclusive, `gt=`, `lt=` exclusive; per item for lists) are LcmError naming the key.
A scalar given for a list field is a one-item list. The resolved config is written next to every output
(`write_resolved`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lcmtool.errors import LcmError
from lcmtool.fileio import atomic_write_text, paired

T = TypeVar("T")


def opt(default: Any = None, help: str = "", *, argument: bool = False, flag: str | None = None,
        min: float | None = None, max: float | None = None, gt: float | None = None, lt: float | None = None,
        finite: bool = True, min_items: int = 0) -> Any:
    """A config field that is also a CLI option (`--name-with-dashes`, or `flag`); `argument`: a positional one.
    An empty help keeps the field a config key only (YAML / --set). `min`/`max` (inclusive) and `gt`/`lt`
    (exclusive) bound a number or each item of a list of numbers; floats must be finite unless `finite=False`;
    a list must hold at least `min_items` items."""
    meta = {"help": help, "argument": argument, "flag": flag, "min": min, "max": max, "gt": gt, "lt": lt,
            "finite": finite, "min_items": min_items}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise LcmError(f"config file {path} is a folder, not a YAML file")
    if not path.exists():
        raise LcmError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LcmError(f"config file {path} is not UTF-8 text (a YAML file was expected)") from None
    except OSError as e:
        raise LcmError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise LcmError(f"bad YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LcmError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_scalar(raw: str) -> Any:
    """`raw` parsed as a YAML scalar; text that is not valid YAML stays a string."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def parse_set(items: list[str] | None) -> dict:
    """`--set a.b=3 --set c=x` -> {"a": {"b": 3}, "c": "x"}; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise LcmError(f"--set takes key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = parse_scalar(raw)
        node = out
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LcmError(f"--set {item!r}: '{'.'.join(parts[:i + 1])}' was already set to a value, "
                               "not a mapping")
        node[parts[-1]] = value
    return out


def _pairs(text: str, key: str) -> dict:
    """'down=1,up=0.8' -> {'down': 1, 'up': 0.8} (values parsed as YAML scalars)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise LcmError(f"config key '{key}': takes name=value pairs, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = parse_scalar(v.strip())
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except LcmError as e:
                errors.append(e)
        raise errors[0] if errors else LcmError(f"config key '{key}': bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise LcmError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # "1,2,3" from a flag or --set
            value = [parse_scalar(v.strip()) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)):  # `--set validation_steps=1` means [1]
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise LcmError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):  # "down=1,up=0.8" from a flag or --set
            value = _pairs(value, key)
        if not isinstance(value, dict):
            raise LcmError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LcmError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LcmError(f"config key '{key}': expected a number, got {type(value).__name__} {value!r}")
        return float(value)  # (finiteness is checked per field, in _check_bounds)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LcmError(f"config key '{key}': expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise LcmError(f"config key '{key}': expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise LcmError(f"config key '{key}': expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    return value


def _name(f: dataclasses.Field, key: str, top: bool) -> str:
    """"config key 'steps' (--steps)": the key, and the flag where the field is a CLI option."""
    meta = f.metadata
    if not top or not meta.get("help") or meta.get("argument"):
        return f"config key '{key}'"
    return f"config key '{key}' (--{meta.get('flag') or f.name.replace('_', '-')})"


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _check_bounds(value: Any, f: dataclasses.Field, key: str, top: bool) -> None:
    """Refuse non-finite floats (unless the field allows them) and numbers outside the field's bounds."""
    if isinstance(value, (list, tuple)):
        if len(value) < f.metadata.get("min_items", 0):
            raise LcmError(f"{_name(f, key, top)}: must hold at least {f.metadata['min_items']} item(s), got none"
                           if not value else f"{_name(f, key, top)}: must hold at least "
                           f"{f.metadata['min_items']} items, got {len(value)}")
        for i, v in enumerate(value):
            _check_bounds(v, f, f"{key}[{i}]", top)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value) and meta.get("finite", True):
        raise LcmError(f"{_name(f, key, top)}: must be a finite number, got {value}")
    for bound, ok, word in (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
                            ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise LcmError(f"{_name(f, key, top)}: must be {word} {_num(b)}, got {_num(value)}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys, wrong types, non-finite floats and out-of-bounds numbers
    raise LcmError naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise LcmError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], prefix + k)
        _check_bounds(kwargs[k], fields[k], prefix + k, top=not prefix)
    return cls(**kwargs)


def resolve(cls: type[T], config_file: str | None = None, flags: dict | None = None,
            sets: list[str] | None = None) -> T:
    """defaults < YAML file < flags (those not None) < --set."""
    data: dict = {}
    if config_file:
        data = deep_merge(data, load_yaml(config_file))
    data = deep_merge(data, {k: v for k, v in (flags or {}).items() if v is not None})
    data = deep_merge(data, parse_set(sets))
    return from_dict(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def resolved_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_resolved(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML next to an output, so every result says how it was made."""
    atomic_write_text(path, resolved_yaml(cfg))


def published_with(cfg, out: str | Path, path: str | Path | None = None):
    """`with published_with(cfg, out): <write out atomically>`: the resolved config (`path`, default
    `out` with suffix .yaml) and the output are published together or not at all (fileio.paired)."""
    return paired(out, path or Path(out).with_suffix(".yaml"), resolved_yaml(cfg).encode())
