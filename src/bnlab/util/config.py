"""Configurations as dataclasses, with strict loading and CLI flags derived from fields.

Why: a run is reproducible only when everything that shapes it is one plain object,
written next to its results and read back verbatim. Loading rejects unknown keys so a
typo in a config file or an old key never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from bnlab.util.errors import ConfigError

T = TypeVar("T")


OMIT_AT_DEFAULT = "omit_at_default"
"""Field metadata key: leave the field out of ``config_to_dict`` while it holds its default."""


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config.

    A field whose metadata sets ``OMIT_AT_DEFAULT`` is left out while it holds its
    default, so a field added that way leaves the saved configs (and config hashes) of
    earlier runs valid: they read back with the default.
    """
    values = dataclasses.asdict(config)
    for field in dataclasses.fields(config):
        if field.metadata.get(OMIT_AT_DEFAULT) and values[field.name] == field.default:
            del values[field.name]
    return values


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` from ``values``; unknown keys are an error that lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s) {unknown}; expected some of {sorted(known)}"
        )
    return cls(**values)


def check(condition: bool, message: str) -> None:
    """ConfigError(``message``) unless ``condition``: the one way configs reject a value."""
    if not condition:
        raise ConfigError(message)


def check_at_least(config: Any, low: int, *names: str) -> None:
    """Each named field of ``config`` is at least ``low``."""
    for name in names:
        value = getattr(config, name)
        check(value >= low, f"expected {name} >= {low} (got {value})")


def check_finite_at_least(config: Any, low: float, *names: str) -> None:
    """Each named float field of ``config`` is finite and at least ``low``."""
    for name in names:
        value = getattr(config, name)
        check(math.isfinite(value) and value >= low, f"expected {name} >= {low:g} (got {value})")


def _flag_type(annotation: Any) -> tuple[Any, bool]:
    """The argparse ``type`` for a field annotation, and whether it is a bool flag."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X] -> X
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0]
    if annotation is bool:
        return None, True
    if annotation in (int, float, str):
        return annotation, False
    raise TypeError(f"no CLI flag for field type {annotation!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` for each field of ``cls`` (help from ``metadata['help']``, then
    the default; a field whose default is None says in its help what not giving it means).

    Flags default to ``None`` (unset) so :func:`config_from_args` keeps the dataclass
    default, or a base config's value, for anything not given on the command line.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind, is_bool = _flag_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = field.metadata.get("help", "")
        if default is not None:  # a None default is "not given", which the help says in words
            help_text = f"{help_text} (default: {default})".strip()
        if is_bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=None,
                                choices=field.metadata.get("choices"), help=help_text)


def config_from_args(cls: type[T], args: argparse.Namespace, base: T | None = None) -> T:
    """``base`` (or the defaults) overridden by every flag that was given."""
    values = config_to_dict(base) if base is not None else {}
    for field in dataclasses.fields(cls):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return config_from_dict(cls, values)
