"""The base of every config: strict frozen models, YAML loading, `--set` overrides, one-line errors.

Models are frozen pydantic models with `extra="forbid"`, so a misspelt key is an error that names it.
`load_config(path, Model)` turns a YAML file into a validated model, or a one-line error naming the file
and the offending field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medmerge.errors import MedmergeError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of all configs: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


AnswerTokens = Annotated[int, Field(ge=2, description="answer tokens the loss counts, eos included")]


class LossSettings(StrictModel):
    """How questions are batched and cut for the answer loss: training, evaluation and search share it."""

    batch_size: int = Field(default=8, ge=1, description="examples per batch (training: per process)")
    max_prompt_tokens: int = Field(default=256, ge=8, description="prompts keep their last n tokens")
    max_answer_tokens: AnswerTokens = 256

    def loss_settings(self) -> LossSettings:
        """These settings alone (a hashable `LossSettings`, whatever model holds them)."""
        return LossSettings(
            batch_size=self.batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
            max_answer_tokens=self.max_answer_tokens,
        )


class ThreadsSetting(StrictModel):
    """`threads` of a command: set once, at the command's entry (see `medmerge.threads`)."""

    threads: int | None = Field(
        default=None, ge=1, description="torch CPU threads of the command (None: torch's default)"
    )


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line: `source: field.path: message; other.field: message`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    return f"{source}: " + "; ".join(parts)


def validate_config(data: object, model: type[T], source: str = "config") -> T:
    """Validate a mapping against `model`, with a one-line error naming `source` and the fields."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MedmergeError(format_validation_error(source, exc)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """`data` with each `dotted.key=VALUE` set (VALUE read as YAML: 3, 0.5, true, [a, b], null)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise MedmergeError(f"{source}: --set {item!r}: expected KEY=VALUE, e.g. train.max_steps=100")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise MedmergeError(f"{source}: --set {item!r}: VALUE is not valid YAML") from None
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MedmergeError(f"{source}: --set {item!r}: {part} is not a mapping of settings")
            node = child
        node[leaf] = value
    return data


def load_config(path: str | Path, model: type[T], overrides: list[str] | None = None) -> T:
    """Read a YAML file, apply `overrides` (see `apply_overrides`), and validate it against `model`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MedmergeError(f"{path}: cannot read config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise MedmergeError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MedmergeError(f"{path}: expected a YAML mapping of settings, found {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides, str(path))
    return validate_config(data, model, str(path))


def normalised_specs(specs: list[str]) -> list[str]:
    """Dataset SPECs parsed (an unknown kind or option is an error) and written in canonical form."""
    from medmerge.data.specs import parse_spec

    return [parse_spec(s).text for s in specs]
