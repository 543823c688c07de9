"""Which questions: dataset SPECs and their seeded split."""

from __future__ import annotations

from pydantic import Field, field_validator

from medmerge.config.base import StrictModel, normalised_specs
from medmerge.data.split import DEFAULT_FRACTIONS


class SplitSettings(StrictModel):
    """The seeded train / validation / test split (medmerge.data.split): training and scoring share it."""

    split_seed: int = Field(default=0, description="seed of the train / validation / test split")
    fractions: tuple[float, float, float] = Field(
        default=DEFAULT_FRACTIONS, description="train, validation, test shares (summing to 1)"
    )

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"expected three non-negative fractions summing to 1, got {fractions}")
        return fractions

    def split_settings(self) -> SplitSettings:
        """This split alone (a hashable `SplitSettings`, whatever model holds it)."""
        return SplitSettings(split_seed=self.split_seed, fractions=self.fractions)


class DataConfig(SplitSettings):
    """Which questions: dataset SPECs and how they are split (see medmerge.data)."""

    specs: list[str] = Field(min_length=1, description="dataset SPECs, e.g. medquad:PATH")
    max_examples: int | None = Field(default=None, ge=1, description="keep the first n pairs of a split")

    @field_validator("specs")
    @classmethod
    def _parse_specs(cls, specs: list[str]) -> list[str]:
        return normalised_specs(specs)
