"""Bad input fails with one clear line before any training; the CLI and the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medmerge.cli import main
from medmerge.config import TrainConfig, load_config
from medmerge.errors import MedmergeError
from medmerge.train import train_expert
from tests.train.helpers import tiny_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _fails_before_training(config, out: Path, match: str) -> None:
    with pytest.raises(MedmergeError, match=match) as err:
        train_expert(config, out, progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists() and not out.with_name(out.name + ".checkpoint").exists()


def test_unknown_target_module_lists_the_choices(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    config = tiny_config(tiny_llama, tiny_qa_jsonl, lora={"target_modules": ["q_proj", "qkv"]})
    _fails_before_training(config, tmp_path / "o", r"target_modules: qkv match no Linear.*choices: .*q_proj")


def test_rank_zero_is_refused_by_the_config() -> None:
    with pytest.raises(MedmergeError, match=r"lora\.r: .*greater than or equal to 1"):
        tiny_config(Path("m"), Path("d.jsonl"), lora={"r": 0})


def test_empty_dataset_and_empty_splits(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails_before_training(tiny_config(tiny_llama, empty), tmp_path / "o", "empty")
    spec = [f"jsonl:{tiny_qa_jsonl}"]
    no_train = tiny_config(tiny_llama, tiny_qa_jsonl, **{"data": {"specs": spec, "fractions": [0, 0.5, 0.5]}})
    _fails_before_training(no_train, tmp_path / "o", "no training pairs")
    no_val = tiny_config(tiny_llama, tiny_qa_jsonl, **{"data": {"specs": spec, "fractions": [0.9, 0, 0.1]}})
    _fails_before_training(no_val, tmp_path / "o", "no validation pairs")


def test_seq2seq_config_on_a_causal_model(tiny_llama, tiny_t5, tiny_qa_jsonl, tmp_path) -> None:
    _fails_before_training(
        tiny_config(tiny_llama, tiny_qa_jsonl, kind="seq2seq"), tmp_path / "o", "causal model"
    )
    _fails_before_training(
        tiny_config(tiny_t5, tiny_qa_jsonl, kind="causal"), tmp_path / "o", "seq2seq model"
    )


def test_existing_output_is_refused(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    (tmp_path / "o").mkdir()
    with pytest.raises(MedmergeError, match="already exists"):
        train_expert(tiny_config(tiny_llama, tiny_qa_jsonl), tmp_path / "o", progress=False)


def test_cli_train_end_to_end(tiny_llama, tiny_qa_jsonl, tmp_path, capsys) -> None:
    config = tiny_config(tiny_llama, tiny_qa_jsonl, max_steps=3, eval_every=0)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp_path / "expert"
    assert main(["train", str(path), "--out", str(out), "--quiet", "--max-steps", "2"]) == 0
    assert f"expert written to {out}" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and manifest["config"]["max_steps"] == 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert main(["train", str(path), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", str(path), "--out", str(out), "--max-steps", "0"]) == 2
    assert "max_steps" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("train-*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_validate(path: Path) -> None:
    config = load_config(path, TrainConfig)
    assert config.method in ("full", "lora", "qlora") and config.data.specs


def test_there_are_shipped_train_configs() -> None:
    names = {p.name for p in CONFIGS.glob("train-*.yaml")}
    assert {"train-lora-medquad.yaml", "train-lora-genmedgpt.yaml", "train-qlora-medquad.yaml"} <= names
