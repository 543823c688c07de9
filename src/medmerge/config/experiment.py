"""`medmerge run` configs: experts per dataset, the multi-task bound, merges, search, verdict."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medmerge.config.base import StrictModel, normalised_specs, validate_config
from medmerge.config.evaluate import EvaluateConfig
from medmerge.config.train import TrainConfig
from medmerge.errors import MedmergeError


class ExpertSpec(StrictModel):
    """One site's expert: a name and the dataset SPEC(s) it is fine-tuned on."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: list[str] = Field(min_length=1)

    @field_validator("data")
    @classmethod
    def _parse_expert_specs(cls, specs: list[str]) -> list[str]:
        return normalised_specs(specs)


class SearchSettings(StrictModel):
    """Merge hyperparameter search: a seeded optimiser, a fixed trial budget per method."""

    sampler: Literal["tpe", "cmaes", "random"] = "tpe"
    trials: int = Field(default=8, ge=1, description="trials per method (methods without knobs use 1)")
    seed: int = 0
    validation_examples: int = Field(default=32, ge=1, description="validation pairs per dataset")
    batch_size: int = Field(default=8, ge=1)
    max_prompt_tokens: int = Field(default=256, ge=8)
    max_answer_tokens: int = Field(default=128, ge=2)


class ExperimentConfig(StrictModel):
    """`medmerge run`: experts per dataset, a multi-task upper bound, every merge, search, verdict."""

    base_model: str = "smollm2-135m"
    experts: list[ExpertSpec] = Field(min_length=2)
    multitask: bool = Field(default=True, description="also train one model on the union (upper bound)")
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    train_examples: int | None = Field(default=None, ge=1, description="first n training pairs per dataset")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig settings but model/data")
    methods: list[str] = Field(default_factory=list, description="merge methods; empty = every method")
    spaces: list[Literal["full", "lora"]] = ["full", "lora"]
    lora_rank: int | None = Field(default=None, ge=1, description="LoRA-space merge rank (default Σ r_i)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads of every step")
    search: SearchSettings = SearchSettings()
    evaluate: dict[str, Any] = Field(default_factory=dict, description="EvaluateConfig settings but data")

    @model_validator(mode="after")
    def _check_parts(self) -> ExperimentConfig:
        from medmerge.merge.registry import METHODS, get_method

        names = [e.name for e in self.experts]
        if len(set(names)) != len(names) or "multitask" in names or "base" in names:
            raise ValueError(f"experts: names must be unique and not 'base'/'multitask', got {names}")
        for method in self.methods:
            try:
                get_method(method)
            except MedmergeError as exc:
                raise ValueError(str(exc)) from None
        if not self.methods:
            object.__setattr__(self, "methods", list(METHODS))
        for forbidden in ("model", "data"):
            if forbidden in self.train:
                raise ValueError(f"train.{forbidden}: set by the experiment (base_model, experts)")
        validate_config({**self.train, "data": {"specs": self.experts[0].data}}, TrainConfig, "train")
        if "data" in self.evaluate:
            raise ValueError("evaluate.data: set by the experiment (the experts' test splits)")
        validate_config(self.evaluate, EvaluateConfig, "evaluate")
        return self
