"""`medmerge train` configs: one expert, its method (full / LoRA / QLoRA) and the loop settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medmerge.config.base import LossSettings, StrictModel, ThreadsSetting
from medmerge.config.data import DataConfig
from medmerge.config.privacy import PrivacySettings


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


class TrainSettings(LossSettings):
    """How an expert is trained: everything of a `TrainConfig` but its model, data and threads.

    `medmerge run` takes these from the experiment's `train` section (the model, data and threads are the
    experiment's own).
    """

    kind: Literal["auto", "causal", "seq2seq"] = Field(
        default="auto", description="model kind the config expects; auto = read it from the model"
    )
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSettings = LoraSettings()
    seed: int = 0
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
    base_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description=(
            "dtype of the frozen base Linear weights (lora/qlora): bfloat16 needs bf16 autocast; "
            "auto = bfloat16 for lora without DoRA when bf16 autocast is on, else float32. "
            "Adapters (master weights, optimizer, saved files) stay float32"
        ),
    )
    qlora_double_quant: bool = False
    privacy: PrivacySettings | None = Field(
        default=None, description="DP-SGD on the LoRA adapters (medmerge.train.privacy); None = off"
    )
    dropout_rng: Literal["counter", "torch"] = Field(
        default="counter",
        description=(
            "LoRA dropout masks on CPU: counter = a parallel counter-based hash keyed from torch's seeded "
            "generator (medmerge.train.dropout), torch = nn.Dropout's sequential generator"
        ),
    )


class TrainConfig(TrainSettings, ThreadsSetting):
    """One expert (`medmerge train`): a model, one dataset, how it is trained (see medmerge.train)."""

    model: str = Field(default="smollm2-135m", description="embedded name or local Hugging Face folder")
    data: DataConfig
