"""Model cards and PEFT-loadable adapters: experts, merged adapters and exports carry a Hub-style README.md;
their adapters record an absolute base folder that `AutoPeftModelForCausalLM` resolves offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from medmerge.config import MergeConfig, validate_config
from medmerge.merge import merge_models
from medmerge.model_card import NOTICE, expert_card, lineage, read_front_matter, render
from medmerge.train import train_expert
from tests.train.helpers import tiny_config


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _auto_peft_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _medmerge_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from medmerge.models import load_model

    with torch.no_grad():
        return load_model(folder)(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 42, 8, 99, 3]])


def test_expert_adapter_loads_with_auto_peft_offline_and_has_a_card(
    tiny_llama, tiny_qa_jsonl, tmp_path, offline, monkeypatch
) -> None:
    monkeypatch.chdir(tiny_llama.parent)  # the config names the base by a relative path
    out = tmp_path / "expert"
    config = tiny_config(Path(tiny_llama.name), tiny_qa_jsonl, max_steps=2, eval_every=0)
    train_expert(config, out, progress=False)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama.resolve())
    monkeypatch.chdir(tmp_path)
    torch.testing.assert_close(_auto_peft_logits(out, IDS), _medmerge_logits(out, IDS), rtol=1e-4, atol=1e-5)
    front = read_front_matter(out)
    assert front["library_name"] == "peft" and front["medmerge"]["kind"] == "expert"
    assert "base_model" not in front  # a local folder has no Hub id; the body names it
    assert {"medmerge", "medical", "lora"} <= set(front["tags"])
    metrics = front["medmerge"]["metrics"]
    assert metrics["val_loss_final"] > 0 and metrics["steps"] == 2
    text = (out / "README.md").read_text()
    assert "not medical advice" in text and "val_loss_final" in text and str(tiny_llama.resolve()) in text


def test_an_expert_of_the_embedded_model_names_its_hub_base(tiny_llama) -> None:
    manifest = {
        "config": {
            "method": "lora",
            "data": {"specs": ["medquad", "jsonl:/private/site.jsonl"]},
            "lora": {"r": 8},
        },
        "inputs": {"base_model": "smollm2-135m"},
        "metrics": {"val_loss_final": 1.5},
    }
    front_text = render(expert_card(manifest, tiny_llama))
    assert front_text.startswith("---\n") and NOTICE in front_text
    import yaml

    front = yaml.safe_load(front_text.split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["license"] == "apache-2.0" and front["datasets"] == [
        "MedQuAD"
    ]  # the private file is not listed
    assert lineage("smollm2-135m").base_model == ("HuggingFaceTB/SmolLM2-135M-Instruct",)


def test_merged_adapter_records_an_absolute_base_and_loads_offline(
    tiny_llama, tmp_path, offline, monkeypatch
):
    from tests.merge.conftest import make_adapter

    adapters = [make_adapter(tiny_llama, tmp_path / f"lora-{seed}", seed=seed) for seed in (1, 2)]
    monkeypatch.chdir(tiny_llama.parent)
    config = validate_config(
        {
            "method": "task_arithmetic",
            "base_model": tiny_llama.name,  # relative: the adapter must not record it as such
            "models": [str(a) for a in adapters],
            "output": "lora",
            "rank": 6,
        },
        MergeConfig,
        "test",
    )
    out = merge_models(config, tmp_path / "merged-lora", progress=False)
    monkeypatch.chdir(tmp_path)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama.resolve())
    assert os.path.isabs(adapter_config["base_model_name_or_path"])
    torch.testing.assert_close(_auto_peft_logits(out, IDS), _medmerge_logits(out, IDS), rtol=1e-4, atol=1e-5)
    front = read_front_matter(out)
    assert front["library_name"] == "peft" and {"merge", "task_arithmetic", "lora"} <= set(front["tags"])
    assert (out / "mergekit_config.yml").read_text().count("+") == 2  # base+adapter for each input


def test_an_export_has_a_card(tiny_t5, tmp_path) -> None:
    from medmerge.export.exporter import export_model

    out = tmp_path / "ct2"
    export_model(str(tiny_t5), "ct2", out, quantization="float32", threads=1)
    front = read_front_matter(out)
    assert front["library_name"] == "ctranslate2" and front["pipeline_tag"] == "text2text-generation"
    assert front["medmerge"]["metrics"]["ct2.token_match"] == 1.0
    assert "not medical advice" in (out / "README.md").read_text()
