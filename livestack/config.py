"""Typed configuration: one frozen dataclass per ``[section]`` of livestack.toml; unknown keys are refused."""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path

from .engine.settings import Config, EngineParams  # noqa: F401  (the settings are the engine's plain values)


class ConfigError(ValueError):
    """A configuration problem, as one sentence naming the file/key."""


SHELL_SECTIONS = ("daemon", "web", "watch", "calibration", "capture", "session", "solve")


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: {value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {value!r} must be a string")
    return value


def make_section(cls, values: dict, where: str):
    """Build dataclass ``cls`` from a dict, refusing unknown keys and wrong types with one sentence."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"{where}: unknown key {k} (known: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], f"{where}.{k}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        # a check that names its own key (`engine.debayer = 'x': …`) is not prefixed with its section again
        # ("livestack.toml: engine: engine.debayer = …")
        source, _, section = where.rpartition(": ")
        if str(err).startswith(f"{section}."):
            raise ConfigError(f"{source}: {err}" if source else str(err)) from err
        raise ConfigError(f"{where}: {err}") from err


def flag_error(err: Exception, key: str, flag: str, value) -> ConfigError:
    """A section's check refused the value that command-line ``flag`` gave its config ``key`` ("stack.kappa"): the
    same sentence, said as the flag the user typed — "--kappa 0: must be in [1.5, 20]" for "stack.kappa = 0.0: …",
    "--token: use at least 8 characters" for "web.token: …" (a value the sentence does not show is not shown)."""
    why = str(err)
    at = why.find(key)
    if at < 0:
        return ConfigError(f"{flag} {_shown(value)}: {why}")
    rest = why[at + len(key):]
    reason = rest.split(": ", 1)[1] if ": " in rest else rest
    return ConfigError(f"{flag} {_shown(value)}: {reason}" if rest.startswith(" = ") else f"{flag}: {reason}")


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_from_dict(d: dict, *, source: str = "config") -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "extra"}
    hints = typing.get_type_hints(Config)
    kwargs: dict = {}
    extra: dict = {}
    for name, values in d.items():
        if name not in sections and name not in SHELL_SECTIONS:
            known = ", ".join(list(sections) + list(SHELL_SECTIONS))
            raise ConfigError(f"{source}: unknown section [{name}] (known: {known})")
        if not isinstance(values, dict):              # `watch = 3` at the top of the file
            raise ConfigError(f"{source}: [{name}] must be a table")
        if name == "capture" and values:   # nothing reads it: a key there would be a setting silently ignored
            raise ConfigError(f"{source}: capture: unknown key {next(iter(values))} ([capture] takes no keys: "
                              "`livestack capture` is set by its options)")
        if name in SHELL_SECTIONS:
            extra[name] = dict(values)
            continue
        kwargs[name] = make_section(hints[name], values, f"{source}: {name}")
    return Config(**kwargs, extra=extra)


def load_config(path: Path | str | None) -> Config:
    """Read livestack.toml (None: defaults).  Raises ConfigError naming the file and the key."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such config file") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path.name}: not valid TOML ({err})") from err
    return config_from_dict(d, source=path.name)


def with_overrides(cfg: Config, **sections: dict) -> Config:
    """A copy of ``cfg`` with some keys of some sections replaced (CLI flags)."""
    changes = {}
    for name, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            changes[name] = dataclasses.replace(getattr(cfg, name), **values)
    return dataclasses.replace(cfg, **changes) if changes else cfg
