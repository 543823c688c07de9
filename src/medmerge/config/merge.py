"""`medmerge merge` configs: the inputs, the method and its parameters, the output form."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from medmerge.config.base import StrictModel, format_validation_error
from medmerge.config.data import DataConfig
from medmerge.errors import MedmergeError


class MergeInput(StrictModel):
    """One model to merge: a Hugging Face model folder or a PEFT LoRA adapter folder, and its weight w_i."""

    path: str
    weight: float = 1.0


class MergeScorerConfig(DataConfig):
    """Validation data that scores candidate soups (soup_greedy): score = −(mean answer NLL per token)."""

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
        try:
            spec.params.model_validate(self.parameters)
        except ValidationError as exc:
            raise ValueError(format_validation_error(f"parameters of {self.method}", exc)) from None
        n = len(self.models)
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            wanted = spec.min_models if spec.max_models == spec.min_models else f"at least {spec.min_models}"
            raise ValueError(f"{self.method} needs {wanted} models, got {n}")
        needs_base = spec.base == "required" or (self.method == "slerp" and self.parameters.get("relative"))
        if needs_base and self.base_model is None:
            raise ValueError(f"{self.method} needs base_model (task vectors are θ_i − θ_base)")
        if (self.output == "lora") != (self.rank is not None):
            raise ValueError("output: lora needs rank: k, and rank is only for output: lora")
        if self.method == "linear" and abs(sum(m.weight for m in self.models)) < 1e-12:
            raise ValueError("linear: the model weights sum to 0")
        return self

    def method_params(self) -> StrictModel:
        """The validated parameters model of this config's method."""
        from medmerge.merge.registry import get_method

        return get_method(self.method).params.model_validate(self.parameters)
