"""FedAvg of LoRA aggregates exactly: the aggregate's B·A is the pair-weighted average of the sites'
updates s·B_i·A_i (sites of different ranks, modules only some sites adapt), and adding it to the base
weights gives base + that average, nothing else changed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, load_file, save

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


def test_robust_rules_are_flowers_formulas():
    """Coordinate-wise median and trimmed mean equal Flower's FedMedian / FedTrimmedAvg aggregates on the
    same arrays (odd and even counts), and the clipping factor is Flower's fixed clipping."""
    import numpy as np
    from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

    from medmerge.federated.fedavg import coordinate_median, trimmed_mean

    g = torch.Generator().manual_seed(0)
    for n in (3, 4, 5):
        stack = torch.randn(n, 6, 7, generator=g, dtype=torch.float64)
        results = [([layer.numpy()], 1) for layer in stack]
        (median,) = aggregate_median(results)
        assert np.array_equal(coordinate_median(stack).numpy(), median)
        for trim in (0.0, 0.2, 0.34, 0.49):
            (trimmed,) = aggregate_trimmed_avg(results, trim)
            assert np.allclose(trimmed_mean(stack, trim).numpy(), trimmed, rtol=0, atol=1e-15)


def test_aggregate_options_apply_the_formulas_to_the_updates(tiny_llama):
    """median / trimmed_mean / clipping act on the ΔW_i themselves (a site without a module counts as
    ΔW = 0 there), re-factored at rank Σ r_i; clip_norm scales each whole update as Flower does."""
    from flwr.supercore.differential_privacy import clip_inputs_inplace

    from medmerge.federated.fedavg import AggregateOptions, coordinate_median, trimmed_mean
    from medmerge.merge.lora import factor

    shapes = base_shapes(tiny_llama)
    sites = {
        "north": adapter(shapes, 2, 4.0, MODULES, 0),
        "south": adapter(shapes, 2, 2.0, MODULES, 1),
        "east": adapter(shapes, 2, 8.0, MODULES[:1], 2),  # adapts only q_proj
    }
    blobs = {s: b for s, (b, _) in sites.items()}
    weights = {"north": 1.0, "south": 1.0, "east": 1.0}
    for rule, combine in (
        ("median", coordinate_median),
        ("trimmed_mean", lambda stack: trimmed_mean(stack, 0.34)),
    ):
        data, info = aggregate(blobs, weights, options=AggregateOptions(rule=rule, trim=0.34))
        got = read_aggregate(data)
        for module in MODULES:
            name = f"{module}.weight"
            stack = torch.stack([d.get(name, torch.zeros(shapes[name])) for _, d in sites.values()])
            rank = 2 * sum(name in d for _, d in sites.values())
            want = factor(combine(stack), rank)  # rank Σ r_i of the sites adapting it: a truncation here
            assert torch.allclose(got[name], want.b @ want.a, atol=1e-5), (rule, name)
        assert info["rule"] == rule and info["max_svd_error"] > 0

    clip = 0.5
    data, info = aggregate(blobs, weights, options=AggregateOptions(clip_norm=clip))
    got = read_aggregate(data)
    clipped = {}
    for site, (_, deltas) in sites.items():
        arrays = [deltas[f"{m}.weight"].double().numpy().copy() for m in MODULES if f"{m}.weight" in deltas]
        clip_inputs_inplace(arrays, clip)  # Flower: scale by min(1, C / ‖update‖)
        clipped[site] = dict(
            zip([f"{m}.weight" for m in MODULES if f"{m}.weight" in deltas], arrays, strict=True)
        )
    for module in MODULES:
        name = f"{module}.weight"
        want = sum(torch.from_numpy(c[name]).float() for c in clipped.values() if name in c) / 3
        assert torch.allclose(got[name], want, atol=1e-5), name
    assert all(0 < s < 1 for s in info["clip_scales"].values())


def test_a_site_cannot_weigh_itself_in():
    """FedAvg weights are bounded: a site claiming 10⁹ pairs counts K_WEIGHT × the reference (median, or
    the other site's with two sites); honest pairs within that bound are used as reported."""
    from medmerge.errors import MedmergeError
    from medmerge.federated.fedavg import K_WEIGHT, AggregateOptions, bounded_weights

    honest = {"north": 800.0, "south": 600.0, "east": 300.0}
    assert bounded_weights(honest) == honest
    assert bounded_weights(honest | {"east": 1e9}) == {
        "north": 800.0,
        "south": 600.0,
        "east": K_WEIGHT * 800.0,
    }
    assert bounded_weights({"north": 800.0, "east": 1e9}) == {"north": 800.0, "east": K_WEIGHT * 800.0}
    assert bounded_weights(honest | {"east": 1e9}, AggregateOptions(weights="uniform")) == dict.fromkeys(
        honest, 1.0
    )
    for bad in (float("nan"), -1.0, 0.0, "800"):
        with pytest.raises(MedmergeError, match="^site east: pairs"):
            bounded_weights(honest | {"east": bad})


def test_a_site_adapter_is_read_in_memory_and_a_broken_one_refused(tiny_llama, tmp_path, monkeypatch):
    """The coordinator parses a site's FedAvg update in memory: a blob named like a path writes nothing
    (before: every blob was written as Path(tmp) / name); NaN values or extra tensors are refused."""
    from medmerge.errors import MedmergeError
    from medmerge.federated.fedavg import adapter_deltas

    shapes = base_shapes(tiny_llama)
    blobs, deltas = adapter(shapes, 2, 4.0, MODULES, 0)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "escaped.pth"
    got = adapter_deltas(blobs | {f"../../../../../../..{target}": b"import os", "../escaped.pth": b"x"})
    assert not target.exists() and not (tmp_path.parent / "escaped.pth").exists()
    assert all(torch.allclose(got[k][0], v) for k, v in deltas.items())

    tensors = load(blobs["adapter_model.safetensors"])
    key = next(iter(tensors))
    nan = dict(tensors)
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    with pytest.raises(
        MedmergeError, match=r"^site south: adapter refused \(tensor .* has non-finite values"
    ):
        aggregate(
            {"north": blobs, "south": blobs | {"adapter_model.safetensors": save(nan)}},
            {"north": 1, "south": 1},
        )
    full = tensors | {
        "base_model.model.model.layers.0.mlp.down_proj.weight": torch.zeros(shapes[f"{MODULES[1]}.weight"])
    }
    with pytest.raises(
        MedmergeError, match=r"^site south: adapter refused \(tensor .* is no lora_A / lora_B matrix"
    ):
        aggregate({"south": blobs | {"adapter_model.safetensors": save(full)}}, {"south": 1})
    pattern = json.dumps({"r": 2, "lora_alpha": 4.0, "alpha_pattern": {"(a+)+$": 8}}).encode()
    with pytest.raises(MedmergeError, match=r"alpha_pattern / rank_pattern are not accepted"):
        aggregate({"south": blobs | {"adapter_config.json": pattern}}, {"south": 1})


def test_a_x1000_update_is_bounded_by_the_median(tiny_llama):
    """One of three sites sends its update ×1000: the mean is ruined (~333× an honest update), the
    coordinate-wise median stays within the honest updates' range."""
    from medmerge.federated.fedavg import AggregateOptions

    shapes = base_shapes(tiny_llama)
    sites = {s: adapter(shapes, 2, 4.0, MODULES, i) for i, s in enumerate(("north", "south", "east"))}
    blobs = {s: b for s, (b, _) in sites.items()}
    poisoned = blobs | {"east": edit_scale(blobs["east"], 1000.0)}
    weights = dict.fromkeys(blobs, 1.0)
    name = f"{MODULES[0]}.weight"
    honest_norm = max(float(d[name].norm()) for _, d in sites.values())
    mean = read_aggregate(aggregate(poisoned, weights)[0])[name]
    median = read_aggregate(aggregate(poisoned, weights, options=AggregateOptions(rule="median"))[0])[name]
    assert float(mean.norm()) > 100 * honest_norm and float(median.norm()) <= honest_norm


def edit_scale(blobs: dict[str, bytes], factor: float) -> dict[str, bytes]:
    tensors = load(blobs["adapter_model.safetensors"])
    scaled = {k: v * factor if ".lora_B." in k else v for k, v in tensors.items()}
    return blobs | {"adapter_model.safetensors": save(scaled)}
