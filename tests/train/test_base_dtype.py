"""LoRA on a bfloat16 frozen base (base_dtype): same training, float32 adapters, PEFT folder, mergeable."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medmerge.errors import MedmergeError
from medmerge.train import train_expert
from medmerge.train.model import build_model, cast_frozen_linears, resolve_base_dtype
from tests.train.helpers import Snapshots, tiny_config

CPU = torch.device("cpu")


def test_base_dtype_resolution(tiny_llama, tiny_qa_jsonl) -> None:
    def resolved(**overrides) -> torch.dtype:
        return resolve_base_dtype(tiny_config(tiny_llama, tiny_qa_jsonl, **overrides), CPU)

    assert resolved(autocast="bf16") == torch.bfloat16  # auto + lora + bf16 autocast
    assert resolved(autocast="off") == torch.float32
    assert resolved(autocast="bf16", method="full") == torch.float32
    assert resolved(autocast="bf16", method="qlora") == torch.float32  # its base Linears are 4-bit already
    assert resolved(autocast="bf16", lora={"use_dora": True}) == torch.float32
    assert resolved(autocast="bf16", base_dtype="float32") == torch.float32
    with pytest.raises(MedmergeError, match="base_dtype: bfloat16 needs bf16 autocast"):
        resolved(autocast="off", base_dtype="bfloat16")
    with pytest.raises(MedmergeError, match="base_dtype: bfloat16 applies to lora"):
        resolved(autocast="bf16", method="full", base_dtype="bfloat16")


def test_cast_frozen_linears_keeps_adapters_and_tied_head_float32(tiny_llama, tiny_qa_jsonl) -> None:
    model, _, _ = build_model(tiny_config(tiny_llama, tiny_qa_jsonl, autocast="bf16"), CPU)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    lora = [n for n in dtypes if "lora_" in n]
    base_linear = [
        n for n in dtypes if ".base_layer." in n or n.endswith(("gate_proj.weight", "up_proj.weight"))
    ]
    assert lora and base_linear
    assert all(dtypes[n] == torch.float32 for n in lora)
    assert all(dtypes[n] == torch.bfloat16 for n in base_linear)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "norm" in n or "embed_tokens" in n)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    assert cast_frozen_linears(model, torch.bfloat16) == 0  # idempotent


def test_bf16_base_lora_trains_saves_float32_and_merges(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    from medmerge.config import MergeConfig
    from medmerge.merge import merge_models
    from medmerge.merge.tensors import folder_tensors, read_tensor
    from medmerge.models import load_model

    out = tmp_path / "expert"
    snaps = Snapshots()
    config = tiny_config(tiny_llama, tiny_qa_jsonl, autocast="bf16", base_dtype="bfloat16")
    train_expert(config, out, progress=False, hooks=[snaps])
    snaps.finish()
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    lora = [n for n in snaps.first if "lora_" in n]
    base = [n for n in snaps.first if "lora_" not in n]
    assert any(snaps.first[n].dtype == torch.bfloat16 for n in base)
    assert all(snaps.changed(n) for n in lora) and not any(snaps.changed(n) for n in base)
    assert metrics["val_loss_final"] < metrics["val_loss_initial"] - 0.2

    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(".lora_" in k and t.dtype == torch.float32 for k, t in saved.items())
    trained = {n: t for n, t in snaps.last.items() if "lora_B" in n}
    for key, tensor in saved.items():  # exactly the trained float32 master weights, PEFT key names
        if "lora_B" in key:
            match = [
                t for n, t in trained.items() if n.replace(".default", "").endswith(key.split("model.", 1)[1])
            ]
            assert len(match) == 1 and torch.equal(match[0], tensor)

    merged = load_model(out)  # adapter on its float32 base, merged
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base_model = load_model(tiny_llama)
    assert any(not torch.equal(p, base_model.state_dict()[n]) for n, p in merged.state_dict().items())

    arithmetic = MergeConfig(
        method="task_arithmetic", base_model=str(tiny_llama), models=[{"path": str(out)}]
    )
    folder = merge_models(arithmetic, tmp_path / "merged", progress=False)
    ours = {n: read_tensor(i) for n, i in folder_tensors(folder).items()}
    reference = merged.state_dict()
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, reference[name], atol=1e-5, rtol=1e-5)
