"""Typed configuration: every YAML medmerge reads is validated here, before any tensor is touched.

Models are frozen pydantic models with `extra="forbid"`, so a misspelt key is an error that names it.
`load_config(path, Model)` turns a YAML file into a validated model, or a one-line error naming the file
and the offending field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


# ------------------------------------------------------------------------------------------- data


def normalised_specs(specs: list[str]) -> list[str]:
    """Dataset SPECs parsed (an unknown kind or option is an error) and written in canonical form."""
    from medmerge.data.specs import parse_spec

    return [parse_spec(s).text for s in specs]


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


# ------------------------------------------------------------------------------------------ merge


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


# ------------------------------------------------------------------------------------------ train


class LoraSettings(StrictModel):
    """LoRA adapters W + (alpha/r)·B·A (or alpha/√r with rsLoRA); DoRA adds a learned magnitude."""

    r: int = Field(default=16, ge=1, description="rank of A (r × in) and B (out × r)")
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear",
        description="module names (suffixes) to adapt; all-linear = every Linear but the head",
    )
    use_rslora: bool = False
    use_dora: bool = False


class TrainConfig(StrictModel):
    """One expert: a model, a method, one dataset, and the loop's settings (see medmerge.train)."""

    model: str = Field(default="smollm2-135m", description="embedded name or local Hugging Face folder")
    kind: Literal["auto", "causal", "seq2seq"] = Field(
        default="auto", description="model kind the config expects; auto = read it from the model"
    )
    method: Literal["full", "lora", "qlora"] = "lora"
    data: DataConfig
    lora: LoraSettings = LoraSettings()
    seed: int = 0
    batch_size: int = Field(default=8, ge=1, description="examples per micro-batch per process")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(
        default=10, ge=0, description="linear warm-up, then cosine decay to min_lr_ratio"
    )
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; overrides epochs")
    max_minutes: float | None = Field(default=None, gt=0, description="wall-clock budget of the loop")
    max_prompt_tokens: int = Field(default=256, ge=8)
    max_answer_tokens: int = Field(default=256, ge=2)
    system_prompt: str | None = None
    group_by_length: bool = True
    eval_every: int = Field(default=50, ge=0, description="validation every n steps; 0 = only at the ends")
    eval_examples: int | None = Field(default=256, ge=1, description="cap on validation pairs")
    early_stopping_patience: int | None = Field(default=None, ge=1, description="evals without improvement")
    keep_best: bool = True
    checkpoint_every: int = Field(default=100, ge=0, description="checkpoint every n steps; 0 = never")
    autocast: Literal["auto", "bf16", "off"] = Field(
        default="auto", description="bf16 autocast: auto = on where the CPU has native bf16 (or on CUDA)"
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's)")
    base_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description=(
            "dtype of the frozen base Linear weights (lora/qlora): bfloat16 needs bf16 autocast; "
            "auto = bfloat16 for lora without DoRA when bf16 autocast is on, else float32. "
            "Adapters (master weights, optimizer, saved files) stay float32"
        ),
    )
    qlora_double_quant: bool = False
    dropout_rng: Literal["counter", "torch"] = Field(
        default="counter",
        description=(
            "LoRA dropout masks on CPU: counter = a parallel counter-based hash keyed from torch's seeded "
            "generator (medmerge.train.dropout), torch = nn.Dropout's sequential generator"
        ),
    )


# -------------------------------------------------------------------------------------------- run


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


# --------------------------------------------------------------------------------------- evaluate


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


# ----------------------------------------------------------------------------------------- export

from pydantic import ValidationInfo  # noqa: E402  (kept in this section: sections are edited separately)

DEFAULT_NOTICE = (
    "Note: this answer was generated by a small language model. It is not medical advice and may be "
    "wrong; for any health concern, see a qualified clinician."
)


class AnswerConfig(StrictModel):
    """How `medmerge ask` / `serve` answer: limits and the safety notice that ends every answer.

    The notice may be changed but not removed silently: an empty notice needs `allow_no_notice: true`.
    """

    allow_no_notice: bool = Field(default=False, description="explicit opt-in to answers without a notice")
    notice: str = Field(default=DEFAULT_NOTICE, max_length=1000, description="appended to every answer")
    max_question_chars: int = Field(default=2000, ge=1, le=100_000)
    max_new_tokens: int = Field(default=256, ge=1, le=4096)
    system_prompt: str | None = Field(default=None, description="system message for chat templates")

    @field_validator("notice")
    @classmethod
    def _notice_not_silently_empty(cls, notice: str, info: ValidationInfo) -> str:
        if not notice.strip() and not info.data.get("allow_no_notice"):
            raise ValueError(
                "empty safety notice (set allow_no_notice: true, or pass --no-notice-i-understand, "
                "to answer without one)"
            )
        return notice
