"""Typed configuration: the machinery every package's sections use, and the root that composes them.

Each package owns its section types in its own ``config.py`` (``data_service.config.DataConfig``,
``trainer.config.ModelConfig``, ``evaluators.config.EvalConfig`` ...), which import nothing but this
module. The root ``Config`` is one dataclass with a field per section, built from ``SECTIONS``: the
table below names each section's owner as a string, so this base never imports the packages that
build on it (docs/design.md, "Map of the code"). YAML presets and ``--set section.key=value``
overrides load through ``load_config``; an unknown key or a wrong type raises ``ConfigError``
naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

# section name -> "module:class" of its owner; the order is the order in YAML dumps
SECTIONS: tuple[tuple[str, str], ...] = (
    ("data", "data_service.config:DataConfig"),
    ("model", "trainer.config:ModelConfig"),
    ("tma", "trainer.config:TMAConfig"),
    ("restore", "trainer.config:RestoreConfig"),
    ("train", "trainer.config:TrainConfig"),
    ("deepspeed", "trainer.config:DeepSpeedConfig"),
    ("ray", "trainer.config:RayConfig"),
    ("eval", "evaluators.config:EvalConfig"),
    ("tracking", "trainer.config:TrackingConfig"),
    ("sweep", "trainer.config:SweepConfig"),
)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


# ------------------------------------------------------------------------------ checks for sections
def check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


def check_len(key: str, seq, n: int) -> None:
    if len(seq) != n:
        raise ConfigError(f"{key}: expected {n} values, got {seq!r}")


def check_range(key: str, value, lo=None, hi=None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}: must be {bounds}, got {value!r}")


def load_object(path: str, key: str = "") -> Any:
    """``"package.module:attr"`` -> the object (a plug-in named by the config, e.g. ``eval.watcher``)."""
    mod, sep, attr = path.partition(":")
    if not sep or not mod or not attr:
        raise ConfigError(f"{key or 'plug-in'}: expected 'package.module:name', got {path!r}")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key or 'plug-in'}: cannot load {path!r}: {e}") from e


# ------------------------------------------------------------------------------------- the root
def _validate(cfg) -> Any:
    """Every section checks itself (``validate(root)``: it may look at the sections below it)."""
    for name, _ in SECTIONS:
        section = getattr(cfg, name)
        if hasattr(section, "validate"):
            section.validate(cfg)
    return cfg


@functools.cache
def root_type() -> type:
    fields = []
    for name, owner in SECTIONS:
        cls = load_object(owner, f"section {name!r}")
        fields.append((name, cls, dataclasses.field(default_factory=cls)))
    cls = dataclasses.make_dataclass(
        "Config", fields,
        namespace={"to_dict": lambda self: dataclasses.asdict(self), "validate": _validate,
                   "__doc__": "The whole run: one field per section (see common.config.SECTIONS)."})
    cls.__module__ = __name__                  # pickles by reference, as common.config.Config
    return cls


def __getattr__(name: str) -> Any:
    if name == "Config":                  # built on first use, so importing this module imports nothing above it
        return root_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if typing.TYPE_CHECKING:
    Config = Any


# ------------------------------------------------------------------------------------ machinery
def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; returns (ok, coerced value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return True, None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, v = _type_ok(value, arg)
                if ok:
                    return True, v
        return False, value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (arg,) = typing.get_args(tp)
        out = []
        for item in value:
            ok, v = _type_ok(item, arg)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        _, varg = typing.get_args(tp)
        out = {}
        for k, item in value.items():
            ok, v = _type_ok(item, varg)
            if not ok:
                return False, value
            out[str(k)] = v
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """A dataclass from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, full + ".")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            raise ConfigError(f"config key '{full}': expected {tname}, got {value!r} ({type(value).__name__})")
        kwargs[key] = coerced
    return cls(**kwargs)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> ("a.b.c", value); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    return key.strip(), (yaml.safe_load(raw) if raw.strip() else "")


def set_path(data: dict, dotted: str, value: Any) -> dict:
    """A copy of ``data`` with the value at ``dotted`` replaced (a mapping value replaces the whole
    subtree: ``--set sweep.space={...}`` sets the space, it does not add to it)."""
    parts = dotted.split(".")
    out = dict(data)
    cur = out
    for p in parts[:-1]:
        nxt = cur.get(p)
        cur[p] = dict(nxt) if isinstance(nxt, dict) else {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def nested(dotted: str, value: Any) -> dict[str, Any]:
    """``"a.b.c", v`` -> {"a": {"b": {"c": v}}}."""
    node: dict[str, Any] = {}
    cur = node
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def read_yaml(path: str | Path) -> dict[str, Any]:
    from common import storage

    p = path if storage.is_remote(path) else Path(path)
    if not storage.isfile(p):
        raise ConfigError(f"config file not found: {p}")
    loaded = yaml.safe_load(storage.read_text(p)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> "Config":
    """Load YAML ``path`` (or defaults), merge ``extra``, then the ``--set`` overrides; validate."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if extra:
        data = merge(data, extra)
    for item in overrides or []:
        data = set_path(data, *parse_override(item))
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> "Config":
    return from_dict(root_type(), data, "").validate()


def save_config(cfg: "Config", path: str | Path) -> None:
    """To a local path or an object-store URI (``common.storage``)."""
    from common import storage

    storage.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def add_config_args(parser) -> None:
    """Add ``--config``, ``--set`` and ``--log-level`` (``common.log``) to an argparse parser."""
    from common.log import add_level_arg

    add_level_arg(parser)
    parser.add_argument("--config", default=None, help="YAML preset (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. train.steps=10")


def parse_config_cli(parser, argv: list[str] | None = None):
    """Parse a CLI built with ``add_config_args``: set the log level and load the config.
    Returns (args, config)."""
    from common.log import configure

    a = parser.parse_args(argv)
    configure(a.log_level)
    return a, load_config(a.config, a.overrides)
