"""Typed configuration: dataclasses loaded from YAML and overridden with `--set key=value`.

A config is a dataclass whose fields are scalars, lists or nested dataclasses (sections).
Declare each field with `param(default, doc, ...)`: the doc is the field's documentation and
the bounds / choices are checked at load time, so a bad value fails at start with the field's
dotted name, the value and what is allowed::

    @dataclass
    class DataConfig:
        alpha: float = param(0.5, "Dirichlet concentration over labels", gt=0)
        partition: str = param("iid", "how samples are split", choices=("iid", "dirichlet"))

    cfg = load_config(RunConfig, "configs/x.yaml", ["data.alpha=0.1"])

Unknown keys are errors too (with a "did you mean" suggestion): a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from edgeray.errors import UserError

_MISSING = dataclasses.MISSING


def param(default: Any = _MISSING, doc: str = "", *, choices: Iterable | None = None,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, default_factory: Any = _MISSING) -> Any:
    """A config field with its documentation and the values it accepts."""
    meta = {"doc": doc, "choices": tuple(choices) if choices is not None else None,
            "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A nested config section, defaulting to the section's own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"doc": (cls.__doc__ or "").strip()})


def load_config(cls: type, path: str | Path | None = None, overrides: Iterable[str] = (),
                data: dict | None = None):
    """Build `cls` from a YAML file (optional), a dict (optional) and `key=value` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML: {_one_line(exc)}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of keys, got {type(raw).__name__}")
    if data:
        raw = _deep_merge(raw, data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        raw = _deep_merge(raw, _nest(key.strip().split("."), _Typed(text, value)))
    return build_section(cls, raw, prefix="")


class _Typed:
    """A ``--set`` value: its text and what YAML reads in it. A text field takes the text
    (``--set runtime.warm_pool=off`` is "off", not YAML's False); any other field the YAML value."""

    def __init__(self, text: str, value: Any):
        self.text, self.value = text, value


def plain_value(value: Any) -> Any:
    """``value`` with every ``--set`` wrapper inside it replaced by its YAML value."""
    if isinstance(value, _Typed):
        return plain_value(value.value)
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_value(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict:
    """The config as plain data (what `config.yaml` of a run holds)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str, str]]:
    """(dotted name, default, doc, allowed values) for every field: the reference docs are
    generated from it."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], name + ".")
        else:
            default = f.default if f.default is not _MISSING else (
                f.default_factory() if f.default_factory is not _MISSING else None)
            rows.append((name, default, f.metadata.get("doc", ""), _allowed(f.metadata)))
    return rows


# ----------------------------------------------------------------------------- internals

_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _allowed(meta: typing.Mapping) -> str:
    if meta.get("choices") is not None:
        return "one of " + ", ".join(map(str, meta["choices"]))
    return ", ".join(f"{sign} {meta[op]}" for op, sign in _SIGNS.items() if meta.get(op) is not None)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _nest(keys: list[str], value: Any) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_section(cls: type, raw: Any, prefix: str = ""):
    """``cls`` from plain data, every field checked; errors name the field as ``prefix + name``."""
    where = prefix.rstrip(".") or "config"
    raw = raw.value if isinstance(raw, _Typed) else raw
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            suggestion = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            if hasattr(cls, "misplaced_key_hint"):  # a section may know where the key belongs
                suggestion = cls.misplaced_key_hint(raw, str(key)) or suggestion
            raise UserError(f"unknown config key {prefix}{key}{suggestion}; "
                            f"allowed in {where}: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build_section(kind, raw[name], prefix + name + ".")
        else:
            kwargs[name] = _check(prefix + name, _coerce(prefix + name, raw[name], kind), f.metadata)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _coerce(name: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    union = origin is typing.Union or origin is types.UnionType
    if isinstance(value, _Typed) and not union:
        try:
            return _coerce(name, value.text if kind is str else value.value, kind)
        except UserError as exc:  # show what was typed ("got 'off'"), not what YAML made of it ("got False")
            message, got, _ = str(exc).rpartition(" got ")
            raise UserError(f"{message} got {value.text!r}" if got else str(exc)) from None
    if union:
        if plain_value(value) is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a mapping, got {value!r}")
        return plain_value(value)
    if kind is Any:
        return plain_value(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{name} must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{name} must be a string, got {value!r}")
    return plain_value(value)


def _check(name: str, value: Any, meta: typing.Mapping) -> Any:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
    for op, ok in (("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b),
                   ("le", lambda v, b: v <= b), ("lt", lambda v, b: v < b)):
        bound = meta.get(op)
        if bound is not None and value is not None and not ok(value, bound):
            raise UserError(f"{name}={value!r} is out of range; it must be {_SIGNS[op]} {bound}")
    return value
