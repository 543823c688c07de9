"""Which questions: dataset SPECs and their seeded split."""

from __future__ import annotations

from pydantic import Field, field_validator

from medmerge.config.base import StrictModel, normalised_specs


class DataConfig(StrictModel):
    """Which questions: dataset SPECs and how they are split (see medmerge.data)."""

    specs: list[str] = Field(min_length=1, description="dataset SPECs, e.g. medquad:PATH")
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_examples: int | None = Field(default=None, ge=1, description="keep the first n pairs of a split")

    @field_validator("specs")
    @classmethod
    def _parse_specs(cls, specs: list[str]) -> list[str]:
        return normalised_specs(specs)

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"expected three non-negative fractions summing to 1, got {fractions}")
        return fractions
