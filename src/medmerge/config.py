"""Typed configuration: every YAML medmerge reads is validated here, before any tensor is touched.

Models are frozen pydantic models with `extra="forbid"`, so a misspelt key is an error that names it.
`load_config(path, Model)` turns a YAML file into a validated model, or a one-line error naming the file
and the offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medmerge.errors import MedmergeError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of all configs: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


def load_config(path: str | Path, model: type[T]) -> T:
    """Read a YAML file and validate it against `model`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MedmergeError(f"{path}: cannot read config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise MedmergeError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MedmergeError(f"{path}: expected a YAML mapping of settings, found {type(data).__name__}")
    return validate_config(data, model, str(path))


# ------------------------------------------------------------------------------------------- data


class DataConfig(StrictModel):
    """Which questions: dataset SPECs and how they are split (see medmerge.data)."""

    specs: list[str] = Field(min_length=1, description="dataset SPECs, e.g. medquad:PATH")
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_examples: int | None = Field(default=None, ge=1, description="keep the first n pairs of a split")

    @field_validator("specs")
    @classmethod
    def _parse_specs(cls, specs: list[str]) -> list[str]:
        from medmerge.data.specs import parse_spec

        return [parse_spec(s).text for s in specs]

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"expected three non-negative fractions summing to 1, got {fractions}")
        return fractions


# ------------------------------------------------------------------------------------------ merge
# (the merge engine's configs live here)

# ------------------------------------------------------------------------------------------ train
# (the training configs live here)

# --------------------------------------------------------------------------------------- evaluate
# (the evaluation configs live here)
