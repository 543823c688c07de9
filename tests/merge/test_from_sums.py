"""RegMean and Fisher merging from sums across sites equal today's merges from each site's statistics."""

from __future__ import annotations

import pytest
import torch

from medmerge.errors import MedmergeError
from medmerge.merge.data_aware import fisher_average, regmean_solve
from medmerge.merge.from_sums import (
    SumLayout,
    add_contributions,
    fisher_from_sums,
    pack_symmetric,
    project_psd,
    regmean_from_sums,
    site_contribution,
    unpack_symmetric,
)

IN, OUT, KV = 12, 10, 4
WEIGHTS = [0.5, 0.3, 0.2]
# q and v read one input (the Gram is stored under q), down reads its own
ALIASES = {"v.weight": "q.weight"}


def _sites(seed: int = 0):
    """Three sites: a shared base, per-site deltas, per-site inputs (Grams) and Fishers."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "q.weight": torch.randn(OUT, IN, generator=g),
        "v.weight": torch.randn(KV, IN, generator=g),
        "down.weight": torch.randn(IN, OUT, generator=g),
        "norm.weight": torch.randn(IN, generator=g),
    }
    sites = []
    for i in range(3):
        deltas = {n: 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        attention = torch.randn(20 + 5 * i, IN, generator=g) * (1 + i)  # rows: token inputs
        mlp = torch.randn(30, OUT, generator=g)
        grams = {"q.weight": attention.T @ attention, "down.weight": mlp.T @ mlp}
        fishers = {n: torch.rand(t.shape, generator=g) ** 3 for n, t in base.items() if t.dim() == 2}
        sites.append((deltas, grams, fishers))
    return base, sites


def _contributions(base, sites, layout=None):
    return [
        site_contribution(deltas, w, grams=grams, aliases=ALIASES, fishers=fishers, layout=layout, tokens=100)
        for w, (deltas, grams, fishers) in zip(WEIGHTS, sites, strict=True)
    ]


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.3, 0.0])
def test_regmean_from_exact_sums_equals_regmean_of_each_sites_grams(alpha: float) -> None:
    base, sites = _sites()
    sums, total = add_contributions(_contributions(base, sites))
    merged = regmean_from_sums(sums, base, total, alpha, aliases=ALIASES)
    assert merged.projected == []
    for name in ("q.weight", "v.weight", "down.weight"):
        thetas = [base[name] + deltas[name] for deltas, _, _ in sites]
        grams = [grams[ALIASES.get(name, name)] for _, grams, _ in sites]
        expected = regmean_solve(thetas, grams, WEIGHTS, alpha)
        assert merged.method[name] == "regmean"
        torch.testing.assert_close(merged.weights[name], expected, rtol=1e-5, atol=1e-6)
    # a weight without a Gram is averaged
    norms = [base["norm.weight"] + d["norm.weight"] for d, _, _ in sites]
    average = sum(w * t for w, t in zip(WEIGHTS, norms, strict=True))
    torch.testing.assert_close(merged.weights["norm.weight"], average / sum(WEIGHTS))
    assert merged.method["norm.weight"] == "linear"


def test_a_public_scale_cancels_and_token_normalisation_weighs_sites_by_w_alone() -> None:
    base, sites = _sites(1)
    exact, total = add_contributions(_contributions(base, sites))
    scaled, _ = add_contributions(_contributions(base, sites, SumLayout(scale=1e4)))
    a = regmean_from_sums(exact, base, total, 0.9, aliases=ALIASES).weights
    b = regmean_from_sums(scaled, base, total, 0.9, aliases=ALIASES).weights
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # tokens: site i divides by its own count, i.e. RegMean on G_i / n_i
    counts = [100, 250, 400]
    contributions = [
        site_contribution(d, w, grams=g, aliases=ALIASES, tokens=n, layout=SumLayout(normalise="tokens"))
        for w, (d, g, _), n in zip(WEIGHTS, sites, counts, strict=True)
    ]
    sums, total = add_contributions(contributions)
    merged = regmean_from_sums(sums, base, total, 1.0, aliases=ALIASES).weights["down.weight"]
    thetas = [base["down.weight"] + d["down.weight"] for d, _, _ in sites]
    grams = [g["down.weight"] / n for (_, g, _), n in zip(sites, counts, strict=True)]
    torch.testing.assert_close(merged, regmean_solve(thetas, grams, WEIGHTS, 1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
def test_fisher_from_exact_sums_equals_fisher_merging(epsilon: float) -> None:
    base, sites = _sites(2)
    sums, total = add_contributions(_contributions(base, sites))
    merged = fisher_from_sums(sums, base, total, epsilon)
    for name in ("q.weight", "v.weight", "down.weight"):
        thetas = [base[name] + d[name] for d, _, _ in sites]
        expected = fisher_average(thetas, [f[name] for _, _, f in sites], WEIGHTS, epsilon)
        torch.testing.assert_close(merged.weights[name], expected, rtol=1e-5, atol=1e-6)


def test_a_noised_sum_is_projected_to_psd_before_the_solve() -> None:
    base, sites = _sites(3)
    sums, total = add_contributions(_contributions(base, sites))
    g = torch.Generator().manual_seed(0)
    noisy = {k: t + 50.0 * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in sums.items()}
    merged = regmean_from_sums(noisy, base, total, 1.0, aliases=ALIASES, noise_std=50.0)
    assert "q.weight" in merged.projected  # eigenvalues below 0 after the noise
    for t in merged.weights.values():
        assert torch.isfinite(t).all()
    matrix = unpack_symmetric(noisy["gram::q.weight"])
    projected, changed = project_psd(matrix)
    assert changed and torch.linalg.eigvalsh(projected).min() > -1e-9
    # the projection is the nearest PSD matrix: it moved the matrix by its negative eigenvalues only
    negative = torch.linalg.eigvalsh(matrix).clamp(max=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(projected - matrix), negative.norm())


def test_packing_round_trips_and_bad_sums_are_refused() -> None:
    m = torch.randn(7, 7, dtype=torch.float64)
    m = m + m.T
    assert pack_symmetric(m).numel() == 28
    torch.testing.assert_close(unpack_symmetric(pack_symmetric(m)), m)
    with pytest.raises(MedmergeError, match="n\\(n\\+1\\)/2"):
        unpack_symmetric(torch.zeros(5))
    base, sites = _sites()
    contributions = _contributions(base, sites)
    del contributions[1].tensors["wg::q.weight"]
    with pytest.raises(MedmergeError, match="different tensor names"):
        add_contributions(contributions)
    sums, total = add_contributions(_contributions(base, sites, SumLayout(diagonal=False)))
    with pytest.raises(MedmergeError, match="wd:: sum"):
        regmean_from_sums(sums, base, total, 0.5, aliases=ALIASES)


def _quantized(sums_of: list[dict[str, torch.Tensor]], bits: int) -> dict[str, torch.Tensor]:
    """Σ over sites through SecAgg+'s quantization (Flower's quantize/dequantize, one range per tensor)."""
    import numpy as np
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    np.random.seed(0)
    out = {}
    for name in sums_of[0]:
        arrays = [s[name].numpy() for s in sums_of]
        limit = float(sum(np.abs(a).max() for a in arrays))
        total = sum(q.astype(np.int64) for q in quantize(arrays, limit, 2**bits)) % 2**32
        (summed,) = dequantize([total], limit, 2**bits)
        out[name] = torch.from_numpy(summed - (len(arrays) - 1) * limit)
    return out


def test_public_input_scales_keep_a_quantized_sum_precise_where_one_dimension_dominates() -> None:
    """Real activations have a few dimensions 10³–10⁴ times larger than the rest (a 'massive' one here):
    with one quantization range per tensor, the small dimensions' entries are lost unless the terms
    travel in the coordinates x / D."""
    base, sites = _sites(4)
    for _, grams, _ in sites:
        for name, g in grams.items():
            scale = torch.ones(g.shape[0], dtype=g.dtype)
            scale[0] = 3e3  # dimension 0 is massive
            grams[name] = g * scale[:, None] * scale[None, :]
    exact, total = add_contributions(_contributions(base, sites))
    reference = regmean_from_sums(exact, base, total, 0.9, aliases=ALIASES).weights
    d = {"q.weight": torch.ones(IN, dtype=torch.float64), "down.weight": torch.ones(OUT, dtype=torch.float64)}
    for t in d.values():
        t[0] = 3e3
    layout = SumLayout(input_scales=d)
    scaled, _ = add_contributions(_contributions(base, sites, layout))
    # exact sums in the scaled coordinates: the same merge
    same = regmean_from_sums(scaled, base, total, 0.9, aliases=ALIASES, input_scales=d).weights
    for name in reference:
        torch.testing.assert_close(same[name], reference[name], rtol=1e-5, atol=1e-6)

    def error(merged):
        names = ("q.weight", "v.weight", "down.weight")
        return max(float((merged[n] - reference[n]).norm() / (reference[n] - base[n]).norm()) for n in names)

    contributions = [c.tensors for c in _contributions(base, sites)]
    plain = regmean_from_sums(_quantized(contributions, 16), base, total, 0.9, aliases=ALIASES).weights
    contributions = [c.tensors for c in _contributions(base, sites, layout)]
    sums = _quantized(contributions, 16)
    equilibrated = regmean_from_sums(sums, base, total, 0.9, aliases=ALIASES, input_scales=d).weights
    assert error(equilibrated) < 1e-3 < 10 * error(equilibrated) < error(plain)
