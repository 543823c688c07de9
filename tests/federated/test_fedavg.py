"""FedAvg of LoRA aggregates exactly: the aggregate's B·A is the pair-weighted average of the sites'
updates s·B_i·A_i (sites of different ranks, modules only some sites adapt), and adding it to the base
weights gives base + that average, nothing else changed."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save

from medmerge.federated.checks import base_shapes
from medmerge.federated.fedavg import aggregate, apply_aggregate, read_aggregate

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def adapter(shapes, rank: int, alpha: float, modules: list[str], seed: int):
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for module in modules:
        out_f, in_f = shapes[f"{module}.weight"]
        a, b = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        deltas[f"{module}.weight"] = (alpha / rank) * b @ a
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha}
    blobs = {"adapter_model.safetensors": save(tensors), "adapter_config.json": json.dumps(config).encode()}
    return blobs, deltas


def test_aggregate_is_the_weighted_average_of_the_updates(tiny_llama, tmp_path):
    shapes = base_shapes(tiny_llama)
    north, dn = adapter(shapes, 2, 4.0, MODULES, 0)
    south, ds = adapter(shapes, 3, 3.0, MODULES[:1], 1)  # adapts only q_proj
    data, info = aggregate({"north": north, "south": south}, {"north": 30.0, "south": 10.0})
    got = read_aggregate(data)
    assert set(got) == {f"{m}.weight" for m in MODULES} and info["max_rank"] == 5
    q, down = (f"{m}.weight" for m in MODULES)
    expected = {q: 0.75 * dn[q] + 0.25 * ds[q], down: 0.75 * dn[down]}
    for name, delta in expected.items():
        assert torch.allclose(got[name], delta, atol=1e-5 * float(delta.abs().max()))
    assert info["max_svd_error"] < 1e-6

    merged = apply_aggregate(tiny_llama, data, tmp_path / "global")
    before = {k: v for f in tiny_llama.glob("*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in merged.glob("*.safetensors") for k, v in load_file(f).items()}
    assert before.keys() == after.keys()
    for name in before:
        want = before[name].float() + got[name] if name in got else before[name].float()
        assert torch.allclose(after[name].float(), want, atol=1e-6), name
    assert (merged / "config.json").is_file()
