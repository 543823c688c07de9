"""Command-line flags generated from a settings model: each field is one flag, its help and default taken
from the field (description, default), so a new setting is one line in its model.

`--name-with-dashes` per field: a Literal gives `choices`; an int / float / str gives that type; a
`bool` gives `--x` / `--no-x`; a fixed-length tuple gives that many values; a list of strings gives a
repeatable flag (`--ood A --ood B`). Every flag defaults to None, so `flag_values` holds only the flags
given, and they override a config file's values.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(default: Any) -> str:
    """A default as the help prints it: `(128)`, `(0.8 0.1 0.1)`; nothing for None or a list."""
    if default is None or isinstance(default, list) or default is ...:
        return ""
    if isinstance(default, tuple):
        return f" ({' '.join(map(str, default))})"
    return f" ({str(default).lower() if isinstance(default, bool) else default})"


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _options(field: FieldInfo) -> dict[str, Any]:
    """The argparse keywords of one field."""
    annotation = _without_none(field.annotation)
    origin = typing.get_origin(annotation)
    help_text = (field.description or "") + ("" if field.default_factory else _shown(field.default))
    options: dict[str, Any] = {"help": help_text.strip() or None, "default": None}
    if annotation is bool:
        return options | {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return options | {"choices": list(typing.get_args(annotation))}
    if origin is tuple:
        args = typing.get_args(annotation)
        return options | {"type": args[0], "nargs": len(args)}
    if origin is list:
        return options | {"action": "append", "metavar": "SPEC"}
    if annotation in (int, float, str):
        return options | {"type": annotation}
    raise TypeError(f"no command-line flag for a field of type {annotation!r}")


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of `model` (module doc)."""
    for name, field in model.model_fields.items():
        parser.add_argument(_flag(name), dest=name, **_options(field))


def flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """{field: value} of the flags of `model` that were given."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name) is not None}
