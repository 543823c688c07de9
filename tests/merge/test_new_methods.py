"""KnOTS, TSV-M, Iso-C, Iso-CTS, Core Space, RegMean and Fisher merging: hand-worked tensors, invariants,
and end-to-end merges of the tiny Llama (full experts with site statistics, LoRA adapters)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from medmerge.config import MergeConfig
from medmerge.errors import MedmergeError
from medmerge.merge import merge_models
from medmerge.merge.data_aware import fisher_average, regmean_solve
from medmerge.merge.lora import delta_weight
from medmerge.merge.methods import Extras, generalized_task_arithmetic
from medmerge.merge.registry import METHODS
from medmerge.merge.sources import open_source
from medmerge.merge.spectral import is_matrix
from medmerge.merge.statistics import input_shortfall, open_statistics
from medmerge.merge.tensors import folder_tensors, read_tensor
from medmerge.site_stats import write_statistics


def _merge(method: str, base, thetas, weights=None, extras=None, **parameters) -> torch.Tensor:
    spec = METHODS[method]
    params = spec.params.model_validate(parameters)
    weights = weights or [1.0] * len(thetas)
    args = (method + ".weight", base, [t.clone() for t in thetas], weights, params)
    return spec.merge(*args, extras).tensor if extras is not None else spec.merge(*args).tensor


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {n: read_tensor(i).to(torch.float32) for n, i in folder_tensors(folder).items()}


# ---- KnOTS


def test_knots_with_task_arithmetic_inside_is_task_arithmetic():
    torch.manual_seed(0)
    base = torch.randn(5, 4)
    thetas = [base + torch.randn(5, 4) for _ in range(3)]
    out = _merge("knots", base, thetas, [1.0, 0.5, 0.2], inner="ta", **{"lambda": 0.8})
    expected = base + 0.8 * sum(w * (t - base) for w, t in zip([1.0, 0.5, 0.2], thetas, strict=True))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_knots_ties_merges_the_aligned_v_blocks():
    torch.manual_seed(1)
    base = torch.randn(4, 3)
    taus = [torch.randn(4, 3), torch.randn(4, 3)]
    out = _merge("knots", base, [base + t for t in taus], inner="ties", density=1.0)
    # by hand: [τ_1 τ_2] = U Σ [V_1ᵀ V_2ᵀ]; TIES (no trim): elected sign of V_1ᵀ + V_2ᵀ, disjoint mean
    u, s, vh = torch.linalg.svd(torch.cat(taus, dim=1).double(), full_matrices=False)
    v1, v2 = vh[:, :3], vh[:, 3:]
    sign = torch.where(v1 + v2 >= 0, 1.0, -1.0).double()
    agree1, agree2 = (v1 * sign > 0).double(), (v2 * sign > 0).double()
    count = (agree1 + agree2).clamp_min(1)
    v_star = (v1 * agree1 + v2 * agree2) / count
    expected = base.double() + (u * s) @ v_star
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_knots_ties_on_low_rank_updates_keeps_only_their_rank():
    """Rank-2 updates (as LoRA's): the SVD of [τ_1 τ_2] has rank ≤ 4; its rows of σ ≈ 0 are arbitrary and
    must not enter the TIES trim. The merge equals TIES of the V blocks cut to the true rank, by hand."""
    torch.manual_seed(2)
    base = torch.randn(12, 10)
    taus = [torch.randn(12, 2) @ torch.randn(2, 10) for _ in range(2)]
    out = _merge("knots", base, [base + t for t in taus], inner="ties", density=0.3)
    u, s, vh = torch.linalg.svd(torch.cat(taus, dim=1), full_matrices=False)
    k = 4  # rank of [τ_1 τ_2]
    assert float(s[k]) < 1e-5 * float(s[0])
    blocks = [vh[:k, :10], vh[:k, 10:]]
    v_star = generalized_task_arithmetic(
        torch.zeros(k, 10), blocks, [1.0, 1.0], sparsifier="magnitude", density=0.3, sign_consensus=True
    ).tensor
    torch.testing.assert_close(out, base + (u[:, :k] * s[:k]) @ v_star, atol=1e-5, rtol=1e-5)


def test_knots_falls_back_to_the_inner_merge_on_vectors_and_embeddings():
    base = torch.zeros(4)
    thetas = [torch.tensor([1.0, -2.0, 0.1, 0.0]), torch.tensor([1.0, 1.0, -0.3, 0.0])]
    spec = METHODS["knots"]
    params = spec.params.model_validate({"inner": "ties", "density": 0.5})
    out = spec.merge("model.norm.weight", base, [t.clone() for t in thetas], [1.0, 1.0], params).tensor
    expected = generalized_task_arithmetic(
        base, thetas, [1.0, 1.0], sparsifier="magnitude", density=0.5, sign_consensus=True
    ).tensor
    torch.testing.assert_close(out, expected)
    assert not is_matrix("model.embed_tokens.weight", torch.zeros(3, 2))
    assert not is_matrix("shared.weight", torch.zeros(3, 2))
    assert is_matrix("model.layers.0.mlp.down_proj.weight", torch.zeros(3, 2))
    assert is_matrix("model.layers.0.mlp.shared_expert.gate_proj.weight", torch.zeros(3, 2))


# ---- TSV-M


def test_tsv_of_orthogonal_tasks_is_their_sum():
    base = torch.randn(4, 4)
    tau1, tau2 = (
        torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0])),
        torch.diag(torch.tensor([0.0, 0.0, 2.0, 1.0])),
    )
    out = _merge("tsv", base, [base + tau1, base + tau2], **{"lambda": 0.5})  # k = 4 · 1/2 = 2 each
    torch.testing.assert_close(out, base + 0.5 * (tau1 + tau2), atol=1e-5, rtol=1e-5)


def test_tsv_truncates_each_task_and_decorrelates_overlapping_ones():
    base = torch.zeros(3, 3)
    tau1 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    out = _merge("tsv", base, [tau1], rank_fraction=1 / 3)  # top-1 of τ_1
    torch.testing.assert_close(out, torch.diag(torch.tensor([3.0, 0.0, 0.0])), atol=1e-6, rtol=0)
    # two rank-1 tasks at 45°: U = [e1, (e1+e2)/√2] is replaced by its nearest orthonormal pair
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1.0, 0.0]) / 2**0.5
    out = _merge("tsv", base, [torch.outer(a, a), torch.outer(b, b)], rank_fraction=1 / 3)
    u = torch.stack([a, b], dim=1)
    p, _, qh = torch.linalg.svd(u, full_matrices=False)
    u_perp = p @ qh
    expected = u_perp @ u_perp.T  # the V's are the same vectors, σ = 1 each
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(u_perp.T @ u_perp, torch.eye(2), atol=1e-5)


def test_tsv_of_a_single_expert_is_that_expert_and_zero_updates_stay_out():
    torch.manual_seed(2)
    base, tau = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(_merge("tsv", base, [base + tau]), base + tau, atol=1e-5, rtol=1e-5)
    # an expert that did not change this tensor adds no (arbitrary) directions to the other's
    out = _merge("tsv", base, [base + tau, base.clone()], rank_fraction=1.0)
    torch.testing.assert_close(out, base + tau, atol=1e-5, rtol=1e-5)


# ---- Iso-C / Iso-CTS


def test_iso_c_flattens_the_spectrum_of_the_sum():
    base = torch.randn(3, 3)
    tau1 = torch.diag(torch.tensor([3.0, 0.0, 0.0]))
    tau2 = torch.diag(torch.tensor([0.0, 1.0, 0.0]))
    out = _merge("iso_c", base, [base + tau1, base + tau2], **{"lambda": 1.5})
    # M = diag(3, 1, 0): rank 2, mean σ over the nonzero spectrum = 2, U Vᵀ = diag(1, 1, 0)
    torch.testing.assert_close(out, base + 1.5 * torch.diag(torch.tensor([2.0, 2.0, 0.0])), atol=1e-5, rtol=0)
    # a rotated M keeps its singular vectors: M = R diag(4, 2) → mean 3 · R
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    out = _merge("iso_c", torch.zeros(2, 2), [rotation @ torch.diag(torch.tensor([4.0, 2.0]))])
    torch.testing.assert_close(out, 3.0 * rotation, atol=1e-5, rtol=0)


def test_iso_cts_keeps_common_and_task_specific_directions():
    base = torch.zeros(4, 4)
    tau1 = torch.diag(torch.tensor([5.0, 0.0, 2.0, 0.5]))
    tau2 = torch.diag(torch.tensor([0.0, 4.0, 0.0, 0.0]))
    # m = 4, common_fraction 0.5: 1 direction per task, common = 2: e1 (5), e2 (4) of M = diag(5, 4, 2, .5);
    # task 1's residual diag(0, 0, 2, .5) gives e3 (2); task 2's residual is 0 and gives nothing.
    out = _merge("iso_cts", base, [tau1, tau2], common_fraction=0.5)
    torch.testing.assert_close(
        out, torch.diag(torch.tensor([11 / 3, 11 / 3, 11 / 3, 0.0])), atol=1e-5, rtol=0
    )
    iso_c = _merge("iso_c", base, [tau1, tau2])
    torch.testing.assert_close(iso_c, torch.diag(torch.tensor([2.875] * 4)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_spectral_methods_average_vectors_and_embeddings(method):
    base = torch.zeros(3)
    thetas = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])]
    spec = METHODS[method]
    params = spec.params.model_validate({"lambda": 0.5})
    out = spec.merge("model.norm.weight", base, [t.clone() for t in thetas], [1.0, 3.0], params).tensor
    torch.testing.assert_close(out, 0.5 * (thetas[0] + 3 * thetas[1]) / 4)
    embeddings = [torch.randn(6, 2), torch.randn(6, 2)]
    out = spec.merge(
        "model.embed_tokens.weight", torch.zeros(6, 2), [e.clone() for e in embeddings], [1.0, 1.0], params
    ).tensor
    torch.testing.assert_close(out, 0.5 * (embeddings[0] + embeddings[1]) / 2)


# ---- Core Space


def _lora_updates(seed: int, ranks=(3, 2, 4), out=12, inp=10):
    generator = torch.Generator().manual_seed(seed)
    factors = [
        (torch.randn(out, r, generator=generator), torch.randn(r, inp, generator=generator)) for r in ranks
    ]
    return factors, [b @ a for b, a in factors]


@pytest.mark.parametrize("inner", ["ta", "iso_c"])
def test_core_space_equals_the_full_space_merge(inner):
    factors, deltas = _lora_updates(3)
    base = torch.randn(12, 10)
    weights = [1.0, 0.6, 0.3]
    thetas = [base + d for d in deltas]
    extras = Extras(factors=tuple(factors))
    core = _merge("core_space", base, thetas, weights, extras, inner=inner, **{"lambda": 0.7})
    if inner == "ta":
        full = _merge("task_arithmetic", base, thetas, weights, **{"lambda": 0.7})
    else:
        full = _merge("iso_c", base, thetas, weights, **{"lambda": 0.7})
    assert float((core - full).abs().max()) < 2e-5


def test_core_space_ties_merges_the_cores():
    factors, deltas = _lora_updates(4, ranks=(2, 3))
    base = torch.randn(12, 10)
    out = _merge(
        "core_space",
        base,
        [base + d for d in deltas],
        None,
        Extras(factors=tuple(factors)),
        inner="ties",
        density=0.4,
    )
    # by hand: U_B, V_A from the stacked factors, cores U_Bᵀ B_i A_i V_A, TIES on them, mapped back
    u_b = torch.linalg.svd(torch.cat([b for b, _ in factors], 1), full_matrices=False).U
    v_a = torch.linalg.svd(torch.cat([a for _, a in factors], 0), full_matrices=False).Vh.T
    cores = [u_b.T @ d @ v_a for d in deltas]
    merged = generalized_task_arithmetic(
        torch.zeros(5, 5), cores, [1.0, 1.0], sparsifier="magnitude", density=0.4, sign_consensus=True
    ).tensor
    torch.testing.assert_close(out, base + u_b @ merged @ v_a.T, atol=1e-4, rtol=1e-4)
    # a single adapter (no trim) comes back as itself, and an untouched input adds nothing
    single = _merge("core_space", base, [base + deltas[0]], None, Extras(factors=(factors[0],)), density=1.0)
    torch.testing.assert_close(single, base + deltas[0], atol=1e-4, rtol=1e-4)
    untouched = (torch.zeros(12, 0), torch.zeros(0, 10))
    out = _merge(
        "core_space",
        base,
        [base + deltas[0], base.clone()],
        None,
        Extras(factors=(factors[0], untouched)),
        inner="ta",
    )
    torch.testing.assert_close(out, base + deltas[0], atol=1e-4, rtol=1e-4)


def test_adapter_factors_multiply_to_the_exact_update(tiny_llama, adapters):
    base = open_source(tiny_llama, None)
    for folder in adapters:
        source = open_source(folder, base)
        for name, module in source.modules.items():
            b, a = source.factors(name)
            torch.testing.assert_close(b @ a, delta_weight(module), atol=1e-6, rtol=1e-5)
        b, a = source.factors("model.norm.weight")
        assert b.shape[1] == 0 and a.shape[0] == 0


# ---- RegMean / Fisher


def test_regmean_with_alpha_1_is_least_squares_on_the_stacked_inputs():
    generator = torch.Generator().manual_seed(5)
    xs = [torch.randn(40, 6, generator=generator, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(4, 6, generator=generator, dtype=torch.float64) for _ in range(3)]
    weights = [1.0, 2.0, 0.5]
    # min_W Σ_i w_i ‖X_i Wᵀ − X_i W_iᵀ‖²: rows of site i scaled by √w_i, one least-squares problem
    x = torch.cat([w**0.5 * xi for w, xi in zip(weights, xs, strict=True)])
    y = torch.cat([w**0.5 * xi @ wi.T for w, xi, wi in zip(weights, xs, ws, strict=True)])
    expected = torch.linalg.lstsq(x, y).solution.T
    grams = [(xi.T @ xi).float() for xi in xs]
    out = regmean_solve([w.float() for w in ws], grams, weights, alpha=1.0)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_regmean_with_alpha_0_averages_each_input_column_by_its_energy():
    grams = [torch.diag(torch.tensor([1.0, 3.0])) + 0.5, torch.diag(torch.tensor([3.0, 1.0])) + 0.5]
    ws = [torch.tensor([[1.0, 1.0]]), torch.tensor([[5.0, -3.0]])]
    out = regmean_solve(ws, grams, [1.0, 1.0], alpha=0.0)  # G̃_i = diag(G_i) = (1.5, 3.5), (3.5, 1.5)
    expected = torch.tensor([[(1.5 * 1 + 3.5 * 5) / 5, (3.5 * 1 - 1.5 * 3) / 5]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_regmean_invariants_and_fallbacks():
    generator = torch.Generator().manual_seed(6)
    w = torch.randn(5, 4, generator=generator)
    x = torch.randn(2, 4, generator=generator)  # fewer tokens than inputs: a singular Gram
    gram = x.T @ x
    stats = Extras(statistics=({"gram": gram}, {"gram": gram}))
    torch.testing.assert_close(
        _merge("regmean", None, [w, w], [0.3, 0.7], stats, alpha=1.0), w, atol=1e-5, rtol=1e-5
    )
    single = Extras(statistics=({"gram": gram},))
    torch.testing.assert_close(_merge("regmean", None, [w], None, single, alpha=0.9), w, atol=1e-5, rtol=1e-5)
    # a site without the Gram of this layer, or a vector: the weighted average
    other = torch.randn(5, 4, generator=generator)
    partial = Extras(statistics=({"gram": gram}, {"gram": None}))
    torch.testing.assert_close(_merge("regmean", None, [w, other], [1.0, 3.0], partial), (w + 3 * other) / 4)


def test_fisher_merging_by_hand():
    thetas = [torch.tensor([1.0, 1.0, 2.0]), torch.tensor([5.0, 3.0, 4.0])]
    fishers = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])]
    out = fisher_average(thetas, fishers, [1.0, 1.0], epsilon=0.0)
    torch.testing.assert_close(out, torch.tensor([4.0, 3.0, 3.0]))  # last entry: no Fisher mass → average
    same = [torch.full((3,), 0.2), torch.full((3,), 0.2)]
    out = fisher_average(thetas, same, [1.0, 3.0], epsilon=1e-8)
    torch.testing.assert_close(out, (thetas[0] + 3 * thetas[1]) / 4)
    stats = Extras(statistics=({"fisher": fishers[0]}, {"fisher": fishers[1]}))
    torch.testing.assert_close(
        _merge("fisher", None, thetas, None, stats, epsilon=1.0),
        (torch.tensor([2.0, 1.0, 1.0]) * thetas[0] + torch.tensor([4.0, 2.0, 1.0]) * thetas[1])
        / torch.tensor([6.0, 3.0, 2.0]),  # F_i + ε with ε = 1
    )


# ---- the engine


def _with_statistics(src: Path, out: Path, seed: int) -> Path:
    """A copy of expert `src` with site statistics (medmerge.site_stats): the Gram of every 2-D
    non-embedding weight (k_proj/v_proj stored as aliases of q_proj's, as `medmerge stats` does) and the
    Fisher of every tensor."""
    shutil.copytree(src, out)
    generator = torch.Generator().manual_seed(seed)
    grams, fishers, aliases = {}, {}, {}
    for name, info in folder_tensors(out).items():
        if len(info.shape) == 2 and "embed" not in name:
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                aliases[name] = name[: -len("k_proj.weight")] + "q_proj.weight"
            else:
                x = torch.randn(30, info.shape[1], generator=generator)
                grams[name] = x.T @ x
        fishers[name] = torch.rand(info.shape, generator=generator)
    write_statistics(out, grams, fishers, {"examples": 30, "tokens": 30}, aliases=aliases)
    return out


@pytest.fixture(scope="module")
def experts_with_statistics(tmp_path_factory, llama_experts) -> list[Path]:
    root = tmp_path_factory.mktemp("with-statistics")
    return [_with_statistics(e, root / e.name, seed=i) for i, e in enumerate(llama_experts)]


SPECTRAL = {"knots": {"density": 0.5}, "tsv": {}, "iso_c": {"lambda": 1.2}, "iso_cts": {}}


@pytest.mark.parametrize("method", list(SPECTRAL))
def test_spectral_methods_merge_full_experts_end_to_end(tmp_path, tiny_llama, llama_experts, method):
    config = MergeConfig(
        method=method,
        base_model=str(tiny_llama),
        models=[str(e) for e in llama_experts],
        parameters=SPECTRAL[method],
    )
    out = merge_models(config, tmp_path / method, progress=False)
    merged, base = _weights(out), _weights(tiny_llama)
    experts = [_weights(e) for e in llama_experts]
    assert merged.keys() == base.keys()
    name = "model.layers.0.mlp.down_proj.weight"
    spec = METHODS[method]
    expected = spec.merge(
        name, base[name], [e[name].clone() for e in experts], [1.0, 1.0], config.method_params()
    ).tensor
    torch.testing.assert_close(merged[name], expected)
    from medmerge.models import load_model

    load_model(out)


@pytest.mark.parametrize("output", ["full", "lora"])
def test_core_space_merges_adapters_end_to_end(tmp_path, tiny_llama, adapters, output):
    lora = {"rank": 6} if output == "lora" else {}
    core = MergeConfig(
        method="core_space",
        base_model=str(tiny_llama),
        models=[str(a) for a in adapters],
        parameters={"inner": "ta"},
        output=output,
        **lora,
    )
    out = merge_models(core, tmp_path / "core", progress=False)
    if output == "lora":
        assert (out / "adapter_config.json").is_file()
        return
    ta = MergeConfig(method="task_arithmetic", base_model=str(tiny_llama), models=[str(a) for a in adapters])
    reference = _weights(merge_models(ta, tmp_path / "ta", progress=False))
    merged = _weights(out)
    assert max(float((merged[n] - reference[n]).abs().max()) for n in merged) < 1e-5
    ties = core.model_copy(update={"parameters": {"inner": "ties", "density": 0.3}})
    assert _weights(merge_models(ties, tmp_path / "ties", progress=False)).keys() == merged.keys()


def test_core_space_refuses_full_model_inputs(tmp_path, tiny_llama, llama_experts):
    config = MergeConfig(
        method="core_space", base_model=str(tiny_llama), models=[str(e) for e in llama_experts]
    )
    with pytest.raises(MedmergeError, match=rf"^{llama_experts[0]}: core_space .* LoRA adapters"):
        merge_models(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_data_aware_methods_merge_end_to_end(tmp_path, tiny_llama, experts_with_statistics, method):
    config = MergeConfig(
        method=method,
        models=[
            {"path": str(experts_with_statistics[0]), "weight": 1.0},
            {"path": str(experts_with_statistics[1]), "weight": 0.5},
        ],
    )
    out = merge_models(config, tmp_path / method, progress=False)
    merged = _weights(out)
    experts = [_weights(e) for e in experts_with_statistics]
    stats = [open_statistics(e) for e in experts_with_statistics]
    name = "model.layers.1.self_attn.v_proj.weight"  # its Gram is stored as q_proj's (an alias)
    thetas = [e[name] for e in experts]
    assert merged.keys() == experts[0].keys()  # the statistics are no weights
    if method == "regmean":
        grams = [s.read("gram", name.replace("v_proj", "q_proj")) for s in stats]
        expected = regmean_solve(thetas, grams, [1.0, 0.5], alpha=0.9)
        embed = "model.embed_tokens.weight"  # no Gram: the weighted average
        torch.testing.assert_close(merged[embed], (experts[0][embed] + 0.5 * experts[1][embed]) / 1.5)
    else:
        expected = fisher_average(thetas, [s.read("fisher", name) for s in stats], [1.0, 0.5], 1e-8)
    torch.testing.assert_close(merged[name], expected)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_data_aware_methods_refuse_experts_without_statistics(
    tmp_path, llama_experts, experts_with_statistics, method
):
    config = MergeConfig(method=method, models=[str(experts_with_statistics[0]), str(llama_experts[1])])
    kind = "gram" if method == "regmean" else "fisher"
    with pytest.raises(
        MedmergeError, match=rf"^{llama_experts[1]}: {method} needs the site's {kind} statistics"
    ):
        merge_models(config, tmp_path / "out", progress=False)
    assert input_shortfall(METHODS[method], experts_with_statistics) is None
    assert input_shortfall(METHODS["linear"], llama_experts) is None


def test_cli_merges_a_new_method_from_yaml_and_refuses_missing_statistics(
    tmp_path, tiny_llama, llama_experts, capsys
):
    import yaml

    from medmerge.cli import main

    config = tmp_path / "knots.yaml"
    models = [str(e) for e in llama_experts]
    parameters = {"inner": "dare_ties", "density": 0.7, "lambda": 0.9, "seed": 3}
    config.write_text(
        yaml.safe_dump(
            {"method": "knots", "base_model": str(tiny_llama), "models": models, "parameters": parameters}
        )
    )
    assert main(["merge", str(config), "--out", str(tmp_path / "knots"), "--quiet"]) == 0
    assert (tmp_path / "knots" / "merge.json").is_file()
    config.write_text(yaml.safe_dump({"method": "regmean", "models": models}))
    assert main(["merge", str(config), "--out", str(tmp_path / "regmean"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{llama_experts[0]}: regmean needs the site's gram statistics" in error and "\n" not in error


def test_an_svd_that_fails_in_float32_is_redone_in_float64(monkeypatch):
    """LAPACK's float32 SVD failed to converge on an Iso-CTS residual of two 135M experts; the fallback
    decomposes x / max|x| in float64."""
    from medmerge.merge import spectral

    x = torch.randn(12, 7) @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.0, 0.0, 0.0])) @ torch.randn(7, 7)
    real_svd = torch.linalg.svd

    def flaky_svd(a, full_matrices=True):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    u, s, vh = spectral._svd(x)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert s.numel() == 4  # cut to the numerical rank
    torch.testing.assert_close(u @ torch.diag(s) @ vh, x, atol=1e-4, rtol=1e-4)
