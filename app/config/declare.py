"""How a setting is declared once and read from the command line or the environment.

A setting is a field of a frozen settings dataclass whose metadata is a ``Setting``: its flag
names, help, how its text is read, its choices. ``python -m app``'s argparse flags
(``add_flags``), what it makes of them (``values_from_args``) and ``app.asgi``'s GPTOSS_*
variables (``values_from_env``) are all made from those fields; the field's default is the
flag's default. A setting's variable is ``GPTOSS_`` and its first flag's name in capitals
(``--max-batch-size``: ``GPTOSS_MAX_BATCH_SIZE``), unless it is ``cli_only``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass
from typing import Any

from app.config.values import ConfigError

SETTING = "gptoss.setting"
ENV_PREFIX = "GPTOSS_"
# What a switch's variable says for on (GPTOSS_CUDA_GRAPHS=1); anything else is off.
TRUE_WORDS = ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class Setting:
    flags: tuple[str, ...]
    help: str
    read: Callable[[str], Any] = str  # the flag's argparse type, and how its variable is read
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    switch: bool = False  # a flag without a value (store_true)
    repeat: bool = False  # the flag may be given again; each value is read, the results joined
    unit: int = 1  # the flag counts in units of this many (MiB: --cache-max-mb sets cache_max_bytes)
    # python -m app reads the variable too when the flag is absent: a secret stays out of `ps`.
    env_in_cli: bool = False
    # No variable: app.asgi has no use for it (Hypercorn binds, drains and runs one process).
    cli_only: bool = False
    # The flag names a preset that ``preset(name, **overrides)`` builds; the declared fields of
    # ``overrides`` are flags of their own whose values, where given, replace the preset's.
    preset: Callable[..., Any] | None = None
    overrides: type | None = None

    @property
    def dest(self) -> str:
        return self.flags[0].removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str | None:
        return None if self.cli_only else ENV_PREFIX + self.dest.upper()


def setting(default: Any, *flags: str, help: str, repr: bool = True, **options: Any) -> Any:
    """A dataclass field declared as a setting, with its default."""
    return dataclasses.field(default=default, metadata=flag(*flags, help=help, **options), repr=repr)


def flag(*flags: str, help: str, **options: Any) -> dict[str, Setting]:
    """The metadata of a setting's field; for a field without a default (a Profile's:
    ``dataclasses.field(metadata=flag(...))``)."""
    return {SETTING: Setting(flags, help, **options)}


def declared(settings: type) -> Iterator[tuple[Field[Any], Setting]]:
    """The fields of a settings dataclass that are settings, with their declarations."""
    for field in dataclasses.fields(settings):
        if SETTING in field.metadata:
            yield field, field.metadata[SETTING]


def every_setting(settings: type) -> Iterator[tuple[Field[Any], Setting]]:
    """``declared``, and after a preset's field the fields that override it (a flag each)."""
    for field, declaration in declared(settings):
        yield field, declaration
        if declaration.overrides is not None:
            yield from declared(declaration.overrides)


def flag_default(field: Field[Any], declaration: Setting) -> Any:
    """The flag's default, made from the field's: None where a preset's value applies."""
    default = field.default
    if default is MISSING or default == ():
        return None
    if declaration.preset is not None:
        return default.name
    return default / declaration.unit if declaration.unit != 1 else default


def add_flags(parser: argparse.ArgumentParser, settings: type, words: Mapping[str, object]) -> None:
    """One flag for each setting of ``settings``; ``words`` fill the ``{name}`` slots of the help
    texts (what this layer cannot import: the model names)."""
    for field, declaration in declared(settings):
        _add_flag(parser, declaration, flag_default(field, declaration), words)
        if declaration.overrides is not None:
            for _, override in declared(declaration.overrides):
                _add_flag(parser, override, None, words)


def _add_flag(parser: argparse.ArgumentParser, declaration: Setting, default: Any, words: Mapping[str, object]) -> None:
    options: dict[str, Any] = {"dest": declaration.dest, "help": declaration.help.format_map(words)}
    if declaration.switch:
        options["action"] = "store_true"
    else:
        options["default"] = default
        if declaration.repeat:
            options["action"] = "append"  # the values are read in values_from_args
        elif declaration.read is not str:
            options["type"] = declaration.read
        if declaration.choices is not None:
            options["choices"] = declaration.choices
        if declaration.metavar is not None:
            options["metavar"] = declaration.metavar
    parser.add_argument(*declaration.flags, **options)


def values_from_args(settings: type, args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of ``settings`` that the parsed flags give (absent ones keep the
    field's default)."""
    values: dict[str, Any] = {}
    for field, declaration in declared(settings):
        raw = getattr(args, declaration.dest)
        if declaration.env_in_cli and raw in (None, "") and declaration.env is not None:
            values[field.name] = _from_text(declaration, env.get(declaration.env) or None)
        elif declaration.preset is not None and declaration.overrides is not None:
            overrides = {item.name: getattr(args, each.dest) for item, each in declared(declaration.overrides)}
            values[field.name] = declaration.preset(raw, **overrides)
        elif declaration.repeat and raw is not None:
            values[field.name] = _joined(declaration.read(value) for value in raw)
        elif raw is not None:
            values[field.name] = _in_units(declaration, raw)
    return {name: value for name, value in values.items() if value is not None}


def values_from_env(settings: type, env: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of ``settings`` that the GPTOSS_* variables give; an unset or empty
    variable keeps the field's default."""
    values: dict[str, Any] = {}
    for field, declaration in declared(settings):
        if declaration.env is None:
            continue
        text = env.get(declaration.env) or None
        if declaration.preset is not None and declaration.overrides is not None:
            overrides = {
                item.name: _from_text(each, env.get(each.env or "") or None)
                for item, each in declared(declaration.overrides)
            }
            values[field.name] = declaration.preset(text or flag_default(field, declaration), **overrides)
        else:
            values[field.name] = _from_text(declaration, text)
    return {name: value for name, value in values.items() if value is not None}


def _from_text(declaration: Setting, text: str | None) -> Any:
    if text is None:
        return None
    if declaration.switch:
        return text.lower() in TRUE_WORDS
    try:
        value = declaration.read(text)
    except ValueError:
        kind = "an integer" if declaration.read is int else "a number" if declaration.read is float else "readable"
        raise ConfigError(f"{declaration.env} must be {kind}, got {text!r}") from None
    if declaration.repeat:
        return _joined([value])
    return _in_units(declaration, value)


def _in_units(declaration: Setting, value: Any) -> Any:
    return int(value * declaration.unit) if declaration.unit != 1 else value


def _joined(parts: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for part in parts for item in part))
