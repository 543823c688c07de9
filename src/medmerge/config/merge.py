"""`medmerge merge` configs: the inputs, the method and its parameters, the output form."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medmerge.config.base import StrictModel
from medmerge.config.data import DataConfig
from medmerge.errors import MedmergeError


class MergeInput(StrictModel):
    """One model to merge: a Hugging Face model folder or a PEFT LoRA adapter folder, and its weight w_i."""

    path: str
    weight: float = 1.0


class MergeScorerConfig(DataConfig):
    """Validation data that scores candidate soups (soup_greedy): score = −(mean answer NLL per token).

    `medmerge merge` builds the scorer from it (medmerge.evaluate.scorer.merge_loss_scorer)."""

    split: Literal["train", "validation", "test"] = "validation"
    batch_size: int = Field(8, ge=1)
    max_prompt_tokens: int = Field(256, ge=1)
    max_answer_tokens: int = Field(256, ge=1)


class MergeConfig(StrictModel):
    """A merge (docs/merging.md): method, inputs, per-method parameters, output form and dtype."""

    method: str
    base_model: str | None = None
    models: list[MergeInput] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    output: Literal["full", "lora"] = "full"
    rank: int | None = Field(None, ge=1, description="LoRA rank of the output (output: lora)")
    shard_mb: float = Field(4096, gt=0, description="largest output shard, MiB")
    scorer: MergeScorerConfig | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _paths_as_inputs(cls, models: Any) -> Any:
        if isinstance(models, list):
            return [{"path": m} if isinstance(m, str) else m for m in models]
        return models

    @model_validator(mode="after")
    def _check_method(self) -> MergeConfig:
        from medmerge.merge.registry import get_method

        try:
            spec = get_method(self.method)
        except MedmergeError as exc:
            raise ValueError(str(exc).removeprefix("method: ")) from None
        spec.check(self.base_model is not None, [m.weight for m in self.models], self.parameters)
        if (self.output == "lora") != (self.rank is not None):
            raise ValueError("output: lora needs rank: k, and rank is only for output: lora")
        return self

    def method_params(self) -> StrictModel:
        """The validated parameters model of this config's method."""
        from medmerge.merge.registry import get_method

        return get_method(self.method).params.model_validate(self.parameters)
