"""End-to-end training on tiny random models: what moves, what stays frozen, and that the loss falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medmerge.train import train_expert
from tests.train.helpers import Snapshots, tiny_config


def _metrics(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["metrics"]


def _train(model: Path, data: Path, out: Path, **overrides) -> tuple[Snapshots, dict]:
    snaps = Snapshots()
    train_expert(tiny_config(model, data, **overrides), out, progress=False, hooks=[snaps])
    snaps.finish()
    return snaps, _metrics(out)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_t5"])
def test_lora_trains_adapters_and_freezes_the_base(model_fixture, request, tiny_qa_jsonl, tmp_path) -> None:
    model = request.getfixturevalue(model_fixture)
    out = tmp_path / "expert"
    snaps, metrics = _train(model, tiny_qa_jsonl, out)
    lora = [n for n in snaps.first if "lora_" in n]
    base = [n for n in snaps.first if "lora_" not in n]
    assert lora and base
    assert all(snaps.changed(n) for n in lora), [n for n in lora if not snaps.changed(n)]
    assert not any(snaps.changed(n) for n in base)
    assert metrics["val_loss_final"] < metrics["val_loss_initial"] - 0.2
    # a standard PEFT folder whose base is the folder the config named, holding exactly the trained B's
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(model.resolve())
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(".lora_" in k for k in saved)
    trained_b = {n: t for n, t in snaps.last.items() if "lora_B" in n}
    assert len([k for k in saved if "lora_B" in k]) == len(trained_b)


def test_full_fine_tuning_changes_the_base(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    out = tmp_path / "full"
    snaps, metrics = _train(tiny_llama, tiny_qa_jsonl, out, method="full", learning_rate=3e-3)
    assert all(snaps.changed(n) for n in snaps.first if n.endswith("weight") and "norm" not in n)
    assert metrics["val_loss_final"] < metrics["val_loss_initial"] - 0.5
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    from medmerge.models import load_model

    reloaded = load_model(out)
    assert torch.equal(reloaded.state_dict()["lm_head.weight"], snaps.last["lm_head.weight"])


def test_qlora_learns_like_lora_with_a_frozen_4bit_base(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    """QLoRA's drop in validation loss must reach 80% of LoRA's on the same data, seed and steps."""
    _, lora = _train(tiny_llama, tiny_qa_jsonl, tmp_path / "lora")
    snaps, qlora = _train(tiny_llama, tiny_qa_jsonl, tmp_path / "qlora", method="qlora")
    packed = [n for n, t in snaps.first.items() if t.dtype == torch.uint8]
    assert packed, "no 4-bit weights in the QLoRA base"
    assert not any(snaps.changed(n) for n in snaps.first if "lora_" not in n)
    assert all(snaps.changed(n) for n in snaps.first if "lora_" in n)
    lora_drop = lora["val_loss_initial"] - lora["val_loss_final"]
    qlora_drop = qlora["val_loss_initial"] - qlora["val_loss_final"]
    assert lora_drop > 0.2 and qlora_drop >= 0.8 * lora_drop, (lora, qlora)
    assert abs(qlora["val_loss_initial"] - lora["val_loss_initial"]) < 0.1  # NF4 base ≈ float32 base


def test_expert_folder_loads_for_the_merge_engine(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    from medmerge.models import load_model

    out = tmp_path / "expert"
    _train(tiny_llama, tiny_qa_jsonl, out, max_steps=4, eval_every=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["base_checksum"] and manifest["inputs"]["data"][0]["train_fingerprint"]
    assert manifest["config"]["method"] == "lora" and manifest["versions"]["torch"]
    curve = (out / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,") and len(curve) == 1 + 1 + 4  # header, step 0, 4 steps
    assert (out / "curve.png").stat().st_size > 1000
    merged = load_model(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
