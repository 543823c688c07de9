"""`medmerge evaluate` configs: the question sets and how they are scored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medmerge.config.base import StrictModel, normalised_specs
from medmerge.config.data import DataConfig


class EvaluateConfig(StrictModel):
    """What `medmerge evaluate` scores and how (see medmerge.evaluate.runner).

    `data` SPECs are in-domain: their `split` (the same seeded split training uses) is scored.
    `ood` SPECs are out-of-domain: every pair of the file is scored. `max_examples` keeps the first n.
    """

    data: list[str] = Field(default_factory=list, description="in-domain SPECs: their `split` is scored")
    ood: list[str] = Field(default_factory=list, description="out-of-domain SPECs: the whole set is scored")
    split: Literal["train", "validation", "test"] = "test"
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_examples: int | None = Field(default=None, ge=1, description="keep the first n pairs of each set")
    generate: bool = Field(default=True, description="generate answers (False: teacher-forced loss only)")
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    batch_size: int = Field(default=8, ge=1, description="questions per generation / loss batch")
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = Field(default=0, description="sampling and bootstrap seed")
    max_prompt_tokens: int = Field(default=256, ge=8)
    max_answer_tokens: int = Field(default=256, ge=2, description="reference tokens the loss counts")
    system: str | None = Field(default=None, description="system prompt for chat-template models")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    bertscore_idf: bool = False
    bootstrap_resamples: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    examples: int = Field(default=3, ge=0, description="example questions per set shown in the report")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (None: torch's default)")

    @field_validator("data", "ood")
    @classmethod
    def _parse_eval_specs(cls, specs: list[str]) -> list[str]:
        return normalised_specs(specs)

    @field_validator("fractions")
    @classmethod
    def _eval_fractions(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        return DataConfig._fractions_sum_to_one(fractions)
