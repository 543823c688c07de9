"""Typed configuration: every YAML medmerge reads is validated here, before any tensor is touched.

Models are frozen pydantic models with `extra="forbid"`, so a misspelt key is an error that names it.
`load_config(path, Model)` turns a YAML file into a validated model, or a one-line error naming the file
and the offending field. One module per command's config; `base` holds what they share.
"""

from medmerge.config.answer import DEFAULT_NOTICE, AnswerConfig
from medmerge.config.base import (
    LossSettings,
    StrictModel,
    ThreadsSetting,
    apply_overrides,
    format_validation_error,
    load_config,
    normalised_specs,
    validate_config,
)
from medmerge.config.data import DataConfig, SplitSettings
from medmerge.config.evaluate import EvaluateConfig, EvaluateSettings
from medmerge.config.experiment import ExperimentConfig, ExpertSpec, SearchSettings
from medmerge.config.merge import MergeConfig, MergeInput, MergeScorerConfig
from medmerge.config.train import LoraSettings, TrainConfig, TrainSettings

__all__ = [
    "DEFAULT_NOTICE",
    "AnswerConfig",
    "DataConfig",
    "EvaluateConfig",
    "EvaluateSettings",
    "ExperimentConfig",
    "ExpertSpec",
    "LoraSettings",
    "LossSettings",
    "MergeConfig",
    "MergeInput",
    "MergeScorerConfig",
    "SearchSettings",
    "SplitSettings",
    "StrictModel",
    "ThreadsSetting",
    "TrainConfig",
    "TrainSettings",
    "apply_overrides",
    "format_validation_error",
    "load_config",
    "normalised_specs",
    "validate_config",
]
