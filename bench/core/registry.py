"""Reducer registry: names -> classes, spec strings -> configured reducers.

Built-in methods are listed in :data:`bench.core.plugins.BUILTIN` by import path (imported on first
use, so one broken method cannot break the others).  External methods register through
the Python entry-point group ``pmbench.reducers``::

    [project.entry-points."pmbench.reducers"]
    mymethod = "my_package.module:MyReducer"

A spec is ``name`` (the method's paper default) or ``name:key=value,key=value``;
list values use brackets, e.g. ``tome:r=[16,16,8,8]``.  ``none`` is the
unreduced model.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Optional

from bench.core.plugins import BUILTIN, REDUCER_GROUP, entry_points
from bench.core.reducer import Calibrated, ConfigError, Reducer

ENTRY_POINT_GROUP = REDUCER_GROUP

_registered: dict[str, type] = {}


def register(cls: type) -> type:
    """Register a Reducer subclass under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Reducer)):
        raise TypeError(f"{cls!r} is not a bench.core.reducer.Reducer subclass")
    _registered[cls.name] = cls
    return cls


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return entry_points(ENTRY_POINT_GROUP)


def _load_path(path: str) -> type:
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


def available() -> list[str]:
    names = set(BUILTIN) | set(_registered) | set(_entry_points())
    return ["none"] + sorted(n for n in names if n != "none")


def get(name: str) -> type:
    """The reducer class for ``name``; a clear error lists the valid names."""
    if name in _registered:
        return _registered[name]
    cls: Optional[type] = None
    eps = _entry_points()
    if name in BUILTIN:
        cls = _load_path(BUILTIN[name])
    elif name in eps:
        try:
            cls = eps[name].load()
        except Exception as e:  # a broken plugin must say so, not vanish
            raise ConfigError(f"plugin reducer '{name}' ({eps[name].value}) failed to load: {e}") from e
    if cls is None:
        raise ConfigError(f"unknown reducer '{name}'; available: {', '.join(available())}")
    if not (isinstance(cls, type) and issubclass(cls, Reducer)):
        raise ConfigError(f"reducer '{name}' does not subclass bench.core.reducer.Reducer")
    if cls.name != name and name != "none":
        cls = type(cls.__name__, (cls,), {"name": name})
    _registered[name] = cls
    return cls


def _split_top(s: str, spec: str = "") -> list[str]:
    """Split on commas that are not inside brackets; empty items (``r=13,,``) and unbalanced
    brackets are errors, not silently dropped."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced '{ch}' in spec '{spec or s}'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ConfigError(f"unclosed bracket in spec '{spec or s}'")
    parts.append("".join(cur))
    if not s.strip():
        return []
    if any(not p.strip() for p in parts):
        raise ConfigError(f"empty option in spec '{spec or s}' (a stray comma?); write name:key=value,key=value")
    return [p.strip() for p in parts]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``'evit:keep=0.7,fuse=true'`` -> ``('evit', {'keep': '0.7', 'fuse': 'true'})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("empty reducer spec; use e.g. 'none', 'tome:r=13' or 'evit:keep=0.7'")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    opts: dict[str, str] = {}
    if not name:
        raise ConfigError(f"spec '{spec}' names no reducer; use e.g. 'tome:r=13'")
    for item in _split_top(rest, spec):
        key, eq, val = item.partition("=")
        if not eq:
            raise ConfigError(f"bad option '{item}' in spec '{spec}': expected key=value")
        key = key.strip()
        if not key:
            raise ConfigError(f"option '{item}' in spec '{spec}' has no name: expected key=value")
        if key in opts:
            raise ConfigError(f"option '{key}' given twice in spec '{spec}'")
        opts[key] = val.strip()
    return name, opts


def build(spec) -> Reducer:
    """A configured reducer from a spec string (or pass a Reducer through)."""
    if isinstance(spec, Reducer):
        return spec
    name, opts = parse_spec(spec)
    cls = get(name)
    return cls(**opts)


def is_calibrated(spec) -> bool:
    """Whether a spec's (or a reducer's) method declares the :class:`bench.core.reducer.Calibrated` capability."""
    return isinstance(build(spec), Calibrated)


def describe_all() -> list[dict]:
    """Name, summary, source and options of every reducer (for ``pmbench list``)."""
    rows = []
    eps = _entry_points()
    for name in available():
        row = {"name": name}
        try:
            cls = get(name)
            row["summary"] = cls.summary
            row["source"] = "builtin" if name in BUILTIN else f"plugin ({eps[name].value})" if name in eps else "registered"
            row["options"] = {
                k: {"type": o.type, "default": o.default, "help": o.help} for k, o in cls.options.items()
            }
            row["default_spec"] = cls().full_spec()
        except Exception as e:
            row["error"] = str(e)
        rows.append(row)
    return rows
