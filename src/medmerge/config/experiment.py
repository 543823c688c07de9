"""`medmerge run` configs: experts per dataset, the multi-task bound, merges, search, verdict."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medmerge.config.base import AnswerTokens, LossSettings, StrictModel, ThreadsSetting, normalised_specs
from medmerge.config.data import DataConfig, SplitSettings
from medmerge.config.evaluate import EvaluateConfig, EvaluateSettings
from medmerge.config.train import TrainConfig, TrainSettings
from medmerge.errors import MedmergeError

# keys of the `train` / `evaluate` sections that the experiment sets itself, and from what
SET_BY_EXPERIMENT = {
    "train": {"model": "base_model", "data": "experts", "threads": "threads"},
    "evaluate": {"data": "the experts' test splits", "threads": "threads"},
}


class ExpertSpec(StrictModel):
    """One site's expert: a name and the dataset SPEC(s) it is fine-tuned on."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: list[str] = Field(min_length=1)

    @field_validator("data")
    @classmethod
    def _parse_expert_specs(cls, specs: list[str]) -> list[str]:
        return normalised_specs(specs)


class SearchSettings(LossSettings):
    """Merge hyperparameter search: a seeded optimiser, a fixed trial budget per method."""

    sampler: Literal["tpe", "cmaes", "random"] = "tpe"
    trials: int = Field(default=8, ge=1, description="trials per method (methods without knobs use 1)")
    seed: int = 0
    validation_examples: int = Field(default=32, ge=1, description="validation pairs per dataset")
    max_answer_tokens: AnswerTokens = 128  # search scores shorter answers than training by default


class StatisticsSettings(StrictModel):
    """The site statistics computed for data-aware merges (RegMean: Gram matrices, Fisher merging:
    diagonal Fisher), on each expert's training questions (medmerge.train.statistics)."""

    examples: int = Field(default=64, ge=1, description="training questions per expert for the Gram")
    fisher_examples: int = Field(default=16, ge=1, description="training questions per expert for the Fisher")
    batch_size: int = Field(default=8, ge=1)

    def arguments(self) -> dict[str, int]:
        """These settings as `medmerge.train.statistics.compute_statistics` keyword arguments."""
        return {
            "max_examples": self.examples,
            "fisher_examples": self.fisher_examples,
            "batch_size": self.batch_size,
        }


def every_method() -> list[str]:
    """Every registered merge method's name (medmerge.merge.registry), in registry order."""
    from medmerge.merge.registry import METHODS

    return list(METHODS)


class ExperimentConfig(SplitSettings, ThreadsSetting):
    """`medmerge run`: experts per dataset, a multi-task upper bound, every merge, search, verdict.

    The split and threads are the experiment's, for every step. `train` and `evaluate` are partial
    overrides of `TrainSettings()` / `EvaluateSettings()`; `train_config` / `evaluate_config` make the
    configs of those steps.
    """

    base_model: str = "smollm2-135m"
    experts: list[ExpertSpec] = Field(min_length=2)
    multitask: bool = Field(default=True, description="also train one model on the union (upper bound)")
    train_examples: int | None = Field(default=None, ge=1, description="first n training pairs per dataset")
    train: TrainSettings = Field(default_factory=TrainSettings, description="how every expert is trained")
    methods: list[str] = Field(
        default_factory=every_method, description="merge methods; empty = every method"
    )
    spaces: list[Literal["full", "lora"]] = ["full", "lora"]
    lora_rank: int | None = Field(default=None, ge=1, description="LoRA-space merge rank (default Σ r_i)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    search: SearchSettings = SearchSettings()
    statistics: StatisticsSettings = Field(
        default_factory=StatisticsSettings, description="site statistics for data-aware merges"
    )
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings, description="how models are scored")
    isolate_steps: bool = Field(
        default=True,
        description="train, compute statistics, search and evaluate each in a child process, so that the"
        " study's peak memory is its largest step's (off: one process, as under torchrun)",
    )

    @model_validator(mode="before")
    @classmethod
    def _sections_leave_the_experiments_keys(cls, data: Any) -> Any:
        for section, owned in SET_BY_EXPERIMENT.items():
            values = data.get(section) if isinstance(data, dict) else None
            for key, source in owned.items():
                if isinstance(values, dict) and key in values:
                    raise ValueError(f"{section}.{key}: set by the experiment ({source})")
        return data

    @field_validator("experts")
    @classmethod
    def _distinct_names(cls, experts: list[ExpertSpec]) -> list[ExpertSpec]:
        names = [e.name for e in experts]
        if len(set(names)) != len(names) or "multitask" in names or "base" in names:
            raise ValueError(f"names must be unique and not 'base'/'multitask', got {names}")
        return experts

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        from medmerge.merge.registry import get_method

        for method in methods:
            try:
                get_method(method)
            except MedmergeError as exc:
                raise ValueError(str(exc)) from None
        return methods or every_method()

    def train_config(self, specs: list[str]) -> TrainConfig:
        """The config of the expert trained on `specs` (the experiment's model, split and train_examples)."""
        data = DataConfig(specs=specs, **self.split_settings().model_dump(), max_examples=self.train_examples)
        return TrainConfig.model_validate({**self.train.model_dump(), "model": self.base_model, "data": data})

    def evaluate_config(self) -> EvaluateConfig:
        """The config of the evaluation: every expert's SPECs in domain, on the experiment's split unless
        the `evaluate` section sets its own."""
        settings = self.split_settings().model_dump() | self.evaluate.model_dump(exclude_unset=True)
        return EvaluateConfig.model_validate({**settings, "data": self.all_specs()})

    def all_specs(self) -> list[str]:
        """Every expert's dataset SPECs, each once, in order (the multi-task model's data)."""
        return list(dict.fromkeys(spec for e in self.experts for spec in e.data))
