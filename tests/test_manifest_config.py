"""Atomic output folders, manifests and config validation."""

from __future__ import annotations

import pytest

from medmerge.config import DataConfig, load_config
from medmerge.errors import MedmergeError
from medmerge.manifest import atomic_dir, build_manifest, checksum


def test_atomic_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.safetensors").write_text("x")
        raise RuntimeError("crash")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_text("y")
    assert (final / "model.safetensors").read_text() == "y"
    with pytest.raises(MedmergeError, match="already exists"), atomic_dir(final):
        pass
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("z")
    assert (final / "model.safetensors").read_text() == "z"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_checksum_and_manifest(tmp_path):
    (tmp_path / "a.safetensors").write_text("1")
    first = checksum(tmp_path)
    (tmp_path / "a.safetensors").write_text("2")
    assert checksum(tmp_path) != first
    second = checksum(tmp_path)
    for record in ("manifest.json", "medmerge-model.json", "medmerge-step.json", "merge.json"):
        (tmp_path / record).write_text('{"created_unix": 1}')  # provenance: not part of the identity
    assert checksum(tmp_path) == second
    (tmp_path / "config.json").write_text("{}")
    assert checksum(tmp_path) != second
    manifest = build_manifest("test", inputs={"x": 1}, config=DataConfig(specs=["medquad:x"]))
    assert manifest["config"]["specs"] == ["medquad:x"] and "torch" in manifest["versions"]


def test_config_errors_are_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("specs: [medquad:x]\nsplit_seed: 1\nfractons: [1, 0, 0]\n")
    with pytest.raises(MedmergeError, match=r"c.yaml: fractons: Extra inputs are not permitted") as err:
        load_config(path, DataConfig)
    assert "\n" not in str(err.value)
    path.write_text("specs: [foo:x]\n")
    with pytest.raises(MedmergeError, match=r"specs.0|specs: .*unknown kind 'foo'"):
        load_config(path, DataConfig)
    path.write_text("- a\n")
    with pytest.raises(MedmergeError, match="expected a YAML mapping"):
        load_config(path, DataConfig)


def test_overrides_set_dotted_keys_and_are_validated(tmp_path):
    from medmerge.config import ExperimentConfig

    path = tmp_path / "study.yaml"
    path.write_text(
        "experts:\n  - {name: a, data: ['jsonl:a.jsonl']}\n  - {name: b, data: ['jsonl:b.jsonl']}\n"
        "train: {method: lora, max_steps: 500}\nsearch: {trials: 24}\n"
    )
    config = load_config(
        path, ExperimentConfig, ["train.max_steps=40", "search.trials=3", "evaluate.ood=[]", "spaces=[full]"]
    )
    assert config.train.max_steps == 40 and config.train.method == "lora"
    assert config.search.trials == 3 and config.spaces == ["full"] and config.evaluate.ood == []
    with pytest.raises(MedmergeError, match="expected KEY=VALUE"):
        load_config(path, ExperimentConfig, ["train.max_steps"])
    with pytest.raises(MedmergeError, match="search.*trials"):
        load_config(path, ExperimentConfig, ["search.trials=0"])
    with pytest.raises(MedmergeError, match="not a mapping"):
        load_config(path, ExperimentConfig, ["train.method.x=1"])


def test_experiment_sections_are_partial_overrides_of_one_default(tmp_path):
    from medmerge.config import EvaluateSettings, ExperimentConfig, TrainSettings
    from medmerge.merge.registry import METHODS

    path = tmp_path / "study.yaml"
    path.write_text(
        "experts:\n  - {name: a, data: ['jsonl:a.jsonl']}\n  - {name: b, data: ['jsonl:b.jsonl']}\n"
        "fractions: [0.6, 0.2, 0.2]\nthreads: 2\ntrain_examples: 5\nmethods: []\n"
        "train: {max_steps: 7, max_answer_tokens: 64}\nevaluate: {split_seed: 3, batch_size: 4}\n"
    )
    config = load_config(path, ExperimentConfig)
    assert config.methods == list(METHODS)  # empty: every method
    assert config.train == TrainSettings(max_steps=7, max_answer_tokens=64)
    train = config.train_config(["jsonl:a.jsonl"])
    assert (train.model, train.max_steps, train.max_answer_tokens) == ("smollm2-135m", 7, 64)
    assert train.threads is None  # the experiment sets threads once, for every step
    assert (train.data.fractions, train.data.split_seed, train.data.max_examples) == ((0.6, 0.2, 0.2), 0, 5)
    evaluate = config.evaluate_config()  # the experiment's split unless the section sets its own
    assert (evaluate.split_seed, evaluate.fractions, evaluate.batch_size) == (3, (0.6, 0.2, 0.2), 4)
    assert evaluate.data == ["jsonl:a.jsonl", "jsonl:b.jsonl"] and evaluate.ood == EvaluateSettings().ood
    assert config.search.max_answer_tokens == 128 and train.max_prompt_tokens == 256  # search's own default
    for key, message in [
        ("train.threads=1", "train.threads: set by the experiment"),
        ("evaluate.data=[x]", "evaluate.data: set by the experiment"),
        ("train.max_steps=0", "train.max_steps"),
        ("evaluate.fractions=[1, 1, 0]", "fractions summing to 1"),
    ]:
        with pytest.raises(MedmergeError, match=message):
            load_config(path, ExperimentConfig, [key])


def test_split_and_loss_settings_are_defined_once():
    from medmerge.config import (
        EvaluateConfig,
        ExperimentConfig,
        LossSettings,
        SearchSettings,
        SplitSettings,
        TrainConfig,
    )
    from medmerge.data.split import DEFAULT_FRACTIONS

    for model in (DataConfig, EvaluateConfig, ExperimentConfig):
        assert issubclass(model, SplitSettings)
    assert EvaluateConfig().fractions == SplitSettings().fractions == DEFAULT_FRACTIONS
    for model in (TrainConfig, EvaluateConfig, SearchSettings):
        assert issubclass(model, LossSettings)
    settings = SearchSettings(batch_size=4)
    assert settings.loss_settings() == LossSettings(batch_size=4, max_answer_tokens=128)
    assert hash(settings.loss_settings()) == hash(LossSettings(batch_size=4, max_answer_tokens=128))
