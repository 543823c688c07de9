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
    assert config.train["max_steps"] == 40 and config.train["method"] == "lora"
    assert config.search.trials == 3 and config.spaces == ["full"] and config.evaluate["ood"] == []
    with pytest.raises(MedmergeError, match="expected KEY=VALUE"):
        load_config(path, ExperimentConfig, ["train.max_steps"])
    with pytest.raises(MedmergeError, match="search.*trials"):
        load_config(path, ExperimentConfig, ["search.trials=0"])
    with pytest.raises(MedmergeError, match="not a mapping"):
        load_config(path, ExperimentConfig, ["train.method.x=1"])
