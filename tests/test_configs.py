"""Every shipped YAML in configs/ loads and validates with the model its name implies."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmerge.config import ExperimentConfig, MergeConfig, TrainConfig, load_config
from medmerge.federated.config import FederatedConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = {
    "train": TrainConfig,
    "merge": MergeConfig,
    "demo": ExperimentConfig,
    "study": ExperimentConfig,
    "federated": FederatedConfig,  # federated-*.yaml: `medmerge federate`
}


def model_for(path: Path) -> type:
    """train-*.yaml → TrainConfig, merge-*.yaml → MergeConfig, demo/study(-*).yaml → ExperimentConfig."""
    prefix = path.stem.split("-")[0]
    if prefix not in MODELS:
        raise AssertionError(f"{path.name}: no config model for its name (expected one of {sorted(MODELS)})")
    return MODELS[prefix]


def test_every_shipped_config_is_checked() -> None:
    assert len(sorted(CONFIGS.glob("*.yaml"))) >= 6


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    model = model_for(path)
    config = load_config(path, model)
    assert isinstance(config, model)
    if model is ExperimentConfig:  # the steps' configs are made from it, so they validate too
        for expert in config.experts:
            assert config.train_config(list(expert.data)).data.specs == list(expert.data)
        assert config.evaluate_config().data == config.all_specs()
    if model is FederatedConfig:  # each site's training config, from its own copy
        for site in config.sites:
            assert config.for_party(site.name).train_config(site.data).data.specs == site.data
