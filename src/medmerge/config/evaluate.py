"""`medmerge evaluate` configs: the question sets and how they are scored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medmerge.config.base import LossSettings, ThreadsSetting, normalised_specs
from medmerge.config.data import SplitSettings


class EvaluateSettings(SplitSettings, LossSettings):
    """How models are scored: everything of an `EvaluateConfig` but its in-domain data and threads.

    `ood` SPECs are out-of-domain: every pair of the file is scored. `max_examples` keeps the first n.
    `medmerge run` takes these from the experiment's `evaluate` section.
    """

    ood: list[str] = Field(default_factory=list, description="out-of-domain SPECs: the whole set is scored")
    split: Literal["train", "validation", "test"] = Field(
        default="test", description="split of the data sets"
    )
    max_examples: int | None = Field(default=None, ge=1, description="keep the first n pairs of each set")
    generate: bool = Field(default=True, description="generate answers (False: teacher-forced loss only)")
    generate_examples: int | None = Field(
        default=None, ge=1, description="generate for the first n questions of each set (None: all)"
    )
    max_new_tokens: int = Field(default=128, ge=1, le=4096, description="answer length limit in tokens")
    pubmedqa_accuracy: bool = Field(
        default=True,
        description="yes/no/maybe accuracy (lm-eval's pubmedqa protocol) on sets with PubMedQA labels",
    )
    do_sample: bool = Field(default=False, description="seeded sampling instead of greedy decoding")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass")
    seed: int = Field(default=0, description="sampling and bootstrap seed")
    system: str | None = Field(default=None, description="system prompt for chat-template models")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="model dtype")
    bertscore_idf: bool = Field(default=False, description="idf-weighted BERTScore")
    bootstrap_resamples: int = Field(default=1000, ge=100, description="bootstrap resamples")
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="interval confidence")
    examples: int = Field(default=3, ge=0, description="example questions per set shown in the report")

    @field_validator("ood")
    @classmethod
    def _parse_ood_specs(cls, specs: list[str]) -> list[str]:
        return normalised_specs(specs)


class EvaluateConfig(EvaluateSettings, ThreadsSetting):
    """What `medmerge evaluate` scores and how (see medmerge.evaluate.runner).

    `data` SPECs are in-domain: their `split` (the same seeded split training uses) is scored.
    """

    data: list[str] = Field(default_factory=list, description="in-domain SPECs: their `split` is scored")

    @field_validator("data")
    @classmethod
    def _parse_data_specs(cls, specs: list[str]) -> list[str]:
        return normalised_specs(specs)
