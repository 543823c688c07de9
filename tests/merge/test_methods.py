"""Exact math of every merge method on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from medmerge.merge import methods, sparsify
from medmerge.merge.registry import METHODS

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
TAU1 = torch.tensor([3.0, -1.0, 2.0, -4.0])
TAU2 = torch.tensor([-2.0, -3.0, 1.0, 5.0])


def test_linear_weighted_average_and_first_model_with_weights_1_0():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(methods.linear([a, b], [1.0, 0.0]), a)
    torch.testing.assert_close(methods.linear([a, b], [1.0, 3.0]), torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(methods.linear([a, b], [1.0, 1.0]), (a + b) / 2)  # uniform soup


def test_slerp_endpoints_are_exact():
    v0, v1 = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.equal(methods.slerp(0.0, v0, v1).tensor, v0)
    assert torch.equal(methods.slerp(1.0, v0, v1).tensor, v1)


def test_slerp_quarter_circle_midpoint():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = methods.slerp(0.5, v0, v1)
    torch.testing.assert_close(out.tensor, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert out.stats["lerp"] == 0.0
    # t = 1/3 of the 90° arc: angle 30°
    torch.testing.assert_close(
        methods.slerp(1 / 3, v0, v1).tensor, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    )


def test_slerp_interpolates_norms_from_unnormalised_vectors():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    out = methods.slerp(0.5, v0, v1).tensor
    s = math.sin(math.pi / 4) / math.sin(math.pi / 2)
    torch.testing.assert_close(out, torch.tensor([2.0 * s, 4.0 * s]))


def test_slerp_colinear_falls_back_to_lerp():
    v0 = torch.tensor([1.0, 2.0, 3.0])
    out = methods.slerp(0.25, v0, 3 * v0)
    assert out.stats["lerp"] == 1.0
    torch.testing.assert_close(out.tensor, 0.75 * v0 + 0.25 * 3 * v0)
    zero = methods.slerp(0.5, torch.zeros(3), v0)  # a zero vector has no direction: lerp
    torch.testing.assert_close(zero.tensor, 0.5 * v0)


def test_slerp_rowwise_uses_one_angle_per_row():
    v0 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    v1 = torch.tensor([[0.0, 1.0], [2.0, 2.0]])  # row 0: 90°, row 1: colinear
    out = methods.slerp(0.5, v0, v1, rowwise=True).tensor
    torch.testing.assert_close(out[0], torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    torch.testing.assert_close(out[1], torch.tensor([1.5, 1.5]))


@pytest.mark.parametrize("rowwise", [False, True])
def test_slerp_over_several_blocks_is_the_float64_formula(rowwise):
    """SLERP sums its norms and dot product over blocks of ELEMENTWISE_CHUNK entries (whole rows when
    rowwise); a tensor spanning several blocks gives the formula computed on whole tensors in float64."""
    gen = torch.Generator().manual_seed(7)
    shape = (5, methods.ELEMENTWISE_CHUNK // 2 + 3)  # 2.5 chunks and a bit: boundaries inside rows
    v0 = torch.randn(shape, generator=gen)
    v1 = 0.6 * v0 + torch.randn(shape, generator=gen)  # cos ≈ 0.5: far from the lerp threshold
    t = 0.3
    out = methods.slerp(t, v0, v1, rowwise=rowwise)
    a, b = v0.double(), v1.double()
    if not rowwise:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    omega = torch.acos(cos)
    expected = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(out.tensor.double(), expected.reshape(shape), rtol=1e-6, atol=1e-6)
    assert out.stats["cos"] == pytest.approx(float(cos.mean()), rel=1e-6)
    assert out.stats["lerp"] == 0.0


def test_task_arithmetic():
    out = methods.generalized_task_arithmetic(BASE, [BASE + TAU1, BASE + TAU2], [1.0, 0.5], lam=2.0)
    torch.testing.assert_close(out.tensor, BASE + 2.0 * (TAU1 + 0.5 * TAU2))
    assert out.stats["tau_norm"] == pytest.approx([float(TAU1.norm()), float(TAU2.norm())])


def test_ties_worked_by_hand():
    # density 0.5 keeps 2 of 4 entries per model: τ̂1 = [3, 0, 0, −4], τ̂2 = [0, −3, 0, 5]
    # Σ w τ̂ with w = [1, 0.5] = [3, −1.5, 0, −1.5] → γ = [+, −, + (sum 0), −]
    # agreeing: e0 model 1 → 3; e1 model 2 → (0.5·−3)/0.5 = −3; e2 none → 0; e3 model 1 → −4
    out = methods.generalized_task_arithmetic(
        BASE,
        [BASE + TAU1, BASE + TAU2],
        [1.0, 0.5],
        sparsifier="magnitude",
        density=0.5,
        sign_consensus=True,
        lam=2.0,
    )
    torch.testing.assert_close(out.tensor, BASE + 2.0 * torch.tensor([3.0, -3.0, 0.0, -4.0]))
    assert out.stats["kept"] == [0.5, 0.5]
    assert out.stats["sign_conflicts"] == 0.25  # entry 3: +5 vs −4


def test_ties_disjoint_mean_is_weighted():
    # both agree on entry 0: (1·2 + 3·4) / (1 + 3) = 3.5
    a, b = torch.tensor([2.0]), torch.tensor([4.0])
    out = methods.generalized_task_arithmetic(
        torch.zeros(1), [a, b], [1.0, 3.0], sparsifier="magnitude", density=1.0, sign_consensus=True
    )
    torch.testing.assert_close(out.tensor, torch.tensor([3.5]))


def test_magnitude_keeps_exactly_k_with_ties_broken_by_index():
    tau = torch.tensor([1.0, -1.0, 1.0, 0.5, -2.0])
    kept, keep = sparsify.magnitude(tau, 0.6)  # k = 3: |−2| and the first two |1|s
    assert keep.tolist() == [True, True, False, False, True]
    torch.testing.assert_close(kept, torch.tensor([1.0, -1.0, 0.0, 0.0, -2.0]))


def test_breadcrumbs_drops_top_outliers_and_small_entries():
    tau = torch.arange(1.0, 11.0)  # |τ| ranks 1..10
    kept, keep = sparsify.breadcrumbs(tau, density=0.5, gamma=0.2)  # drop top 2, keep next 5
    assert keep.tolist() == [False] * 3 + [True] * 5 + [False] * 2
    assert torch.equal(kept, tau * keep)


def test_dare_keeps_about_density_and_rescales():
    tau = torch.randn(20_000)
    kept, keep = sparsify.bernoulli(tau, 0.3, sparsify.tensor_generator(0, "w", 0))
    assert abs(float(keep.float().mean()) - 0.3) < 0.015
    torch.testing.assert_close(kept[keep], tau[keep] / 0.3)
    assert torch.all(kept[~keep] == 0)


def test_dare_expectation_is_task_arithmetic():
    base = torch.zeros(50)
    thetas = [torch.linspace(-1, 1, 50), torch.linspace(2, -2, 50)]
    weights = [1.0, 0.5]
    target = methods.generalized_task_arithmetic(base, thetas, weights).tensor
    runs = torch.stack(
        [
            methods.generalized_task_arithmetic(
                base, thetas, weights, sparsifier="bernoulli", density=0.5, seed=s, name="w"
            ).tensor
            for s in range(3000)
        ]
    )
    # per-entry sd of one run ≤ ‖(τ1, 0.5 τ2)‖·1 = √2; of the mean of 3000: ≤ 0.026
    assert float((runs.mean(0) - target).abs().max()) < 0.13
    assert float((runs[0] - target).abs().max()) > 0.5  # a single draw is not the expectation


def test_dare_masks_depend_on_seed_name_and_model_only():
    tau = torch.randn(1000)
    one = sparsify.bernoulli(tau, 0.5, sparsify.tensor_generator(7, "layer.0.w", 1))[1]
    again = sparsify.bernoulli(tau, 0.5, sparsify.tensor_generator(7, "layer.0.w", 1))[1]
    assert torch.equal(one, again)
    for other in [(8, "layer.0.w", 1), (7, "layer.1.w", 1), (7, "layer.0.w", 0)]:
        assert not torch.equal(one, sparsify.bernoulli(tau, 0.5, sparsify.tensor_generator(*other))[1])


def test_random_draws_are_uniform_and_reproducible():
    generator = sparsify.tensor_generator(3, "model.embed_tokens.weight", 1)
    shape = (3, 100_003)
    one, again = (
        generator.uniform(shape),
        sparsify.tensor_generator(3, "model.embed_tokens.weight", 1).uniform(shape),
    )
    assert one.shape == shape and one.dtype == torch.float32 and torch.equal(one, again)
    assert 0.0 <= float(one.min()) and float(one.max()) < 1.0
    assert abs(float(one.mean()) - 0.5) < 0.005
    assert not torch.equal(one, sparsify.tensor_generator(3, "model.embed_tokens.weight", 0).uniform(shape))


@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_chunked_task_arithmetic_is_the_whole_tensor_formula_to_the_bit(density, consensus):
    """Task arithmetic, DARE and their TIES sign consensus run over chunks (methods.ELEMENTWISE_CHUNK);
    a tensor that spans several chunks gives exactly the formula computed on whole tensors:
    θ_base + λ·Σ w_i τ̂_i / Σ w_i, or with consensus θ_base + λ·δ, δ_j = Σ_{i agrees} w_i τ̂_ij /
    Σ_{i agrees} w_i, agreeing with γ = sign(Σ w_i τ̂_i)."""
    shape = (3, methods.ELEMENTWISE_CHUNK // 2 + 7)  # 1.5 chunks and a bit: boundaries inside rows
    base = torch.randn(shape)
    thetas = [base + torch.randn(shape), base + torch.randn(shape)]
    weights = [0.6, 0.9]
    merged = methods.generalized_task_arithmetic(
        base,
        thetas,
        weights,
        sparsifier="bernoulli",
        density=density,
        sign_consensus=consensus,
        normalize=True,
        lam=1.3,
        seed=4,
        name="w",
    )
    weighted_sum = torch.zeros(shape)
    kept, taus = [], []
    for i, (theta, w) in enumerate(zip(thetas, weights, strict=True)):
        tau = theta - base
        if density < 1.0:
            tau, keep = sparsify.bernoulli(tau, density, sparsify.tensor_generator(4, "w", i))
            kept.append(int(keep.sum()) / keep.numel())
        weighted_sum.add_(tau, alpha=w)
        taus.append(tau)
    if consensus:
        gamma = torch.where(weighted_sum >= 0, 1.0, -1.0)
        numerator, denominator = torch.zeros(shape), torch.zeros(shape)
        for tau, w in zip(taus, weights, strict=True):
            numerator.add_((tau * gamma).relu(), alpha=w)
            denominator.add_(tau * gamma > 0, alpha=w)
        delta = (numerator * gamma).div_(torch.where(denominator == 0, 1.0, denominator))
        conflicts = torch.stack([(tau * gamma < 0) for tau in taus]).any(0)
        assert merged.stats["sign_conflicts"] == int(conflicts.sum()) / conflicts.numel()
        assert int(conflicts.sum()) > 0  # the case being checked: models disagree somewhere
        if density < 1.0:  # and, with drops, some entries have no agreeing model (δ = 0 there)
            assert int((denominator == 0).sum()) > 0
    else:
        delta = weighted_sum.div_(sum(weights))
    expected = delta.mul_(1.3).add_(base)
    assert torch.equal(merged.tensor, expected)
    assert merged.stats["kept"] == (kept or [1.0, 1.0])
    norms = [float((theta - base).norm()) for theta in thetas]
    assert merged.stats["tau_norm"] == pytest.approx(norms, rel=1e-5)


def test_della_probabilities_ranked_by_magnitude():
    tau = torch.tensor([[0.1, -3.0, 2.0], [5.0, 0.0, -1.0]])
    p = sparsify.della_probabilities(tau, density=0.5, epsilon=0.2)
    torch.testing.assert_close(p, torch.tensor([[0.3, 0.7, 0.5], [0.7, 0.3, 0.5]]))


def test_della_keeps_about_density_and_is_unbiased():
    tau = torch.randn(400, 50)
    kept, keep = sparsify.della(tau, 0.4, 0.2, sparsify.tensor_generator(0, "w", 0))
    assert abs(float(keep.float().mean()) - 0.4) < 0.02
    p = sparsify.della_probabilities(tau, 0.4, 0.2)
    torch.testing.assert_close(kept[keep], (tau / p)[keep])
    # larger magnitudes survive more often
    big = tau.abs() > tau.abs().median()
    assert float(keep[big].float().mean()) > float(keep[~big].float().mean()) + 0.1


@pytest.mark.parametrize("shape", [(7, sparsify.DROP_BLOCK // 3 + 5), (3 * sparsify.DROP_BLOCK + 11,)])
@pytest.mark.parametrize("inplace", [False, True])
def test_della_in_blocks_is_the_whole_tensor_formula_to_the_bit(shape, inplace):
    """DELLA runs over blocks of whole rows (sparsify.DROP_BLOCK entries); on a tensor spanning several
    blocks its mask and result are exactly those of p = della_probabilities(τ), keep = U(τ's shape) < p,
    τ·keep/p on the whole tensor (a 1-D tensor is one row, one block)."""
    tau = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    draws = sparsify.tensor_generator(9, "w", 1)
    p = sparsify.della_probabilities(tau, 0.4, 0.1)
    expected_keep = draws.uniform(tau.shape) < p
    expected = tau * expected_keep / p
    given = tau.clone()
    kept, keep = sparsify.della(given, 0.4, 0.1, draws, inplace=inplace)
    assert torch.equal(keep, expected_keep) and torch.equal(kept, expected)
    assert (kept.data_ptr() == given.data_ptr()) is inplace
    assert torch.equal(given, kept if inplace else tau)


def test_model_stock_ratio_from_angle():
    base = torch.zeros(2)
    thetas = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]  # cos = 0 → t = 0 → base
    out = methods.model_stock(base, thetas)
    torch.testing.assert_close(out.tensor, base)
    thetas = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]  # cos = 1/√2, N = 2
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    out = methods.model_stock(base, thetas)
    torch.testing.assert_close(out.tensor, t * torch.tensor([1.0, 0.5]))
    assert out.stats["t"] == pytest.approx(t)


def test_model_stock_filter_wise():
    base = torch.zeros(2, 2)
    thetas = [torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])]
    out = methods.model_stock(base, thetas, filter_wise=True).tensor
    torch.testing.assert_close(out[0], torch.zeros(2))  # orthogonal row: base
    torch.testing.assert_close(out[1], torch.tensor([1.5, 1.5]))  # colinear row: t = 1, the mean


def test_karcher_mean_of_two_unit_vectors_is_the_arc_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    out = methods.karcher([a, b], [1.0, 1.0], max_iter=50, tol=1e-9).tensor
    torch.testing.assert_close(out, 2.0 * torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # weights pull the direction: weight 3:1 → angle 22.5° from a
    out = methods.karcher([a, b], [3.0, 1.0], max_iter=100, tol=1e-10).tensor
    angle = math.atan2(float(out[1]), float(out[0]))
    assert angle == pytest.approx(math.pi / 8, abs=1e-5)
    assert float(out.norm()) == pytest.approx((3 * 1 + 1 * 3) / 4)


SETTINGS = {
    "linear": {},
    "slerp": {"t": 0.4},
    "task_arithmetic": {"normalize": True},
    "ties": {"density": 1.0},
    "dare_linear": {"density": 1.0, "normalize": True},
    "dare_ties": {"density": 1.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.0, "normalize": True},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.0},
    "della": {"density": 1.0, "epsilon": 0.0},
    "della_linear": {"density": 1.0, "epsilon": 0.0, "normalize": True},
    "model_stock": {},
    "karcher": {},
    "knots": {"inner": "ties", "density": 1.0},
    "tsv": {"rank_fraction": 1.0},  # the default keeps 1/n of the spectrum: copies give a truncation
    "iso_c": {"lambda": 0.5},  # a sum over tasks: copies of 2 give 2τ, scaled back by λ = 1/2
    "iso_cts": {"lambda": 0.5},
    "core_space": {"inner": "ties", "density": 1.0},  # without factors: the inner merge in full space
    "regmean": {},  # without statistics: the average
    "regmean_plus_plus": {},  # without its data pass: the average
    "fisher": {},
}
# Iso-C/CTS flatten the spectrum, so only a task vector with a flat spectrum survives them unchanged
ISOTROPIC = {"iso_c", "iso_cts"}


@pytest.mark.parametrize("name", [m for m in METHODS if m != "soup_greedy"])
def test_identical_models_give_that_model(name):
    spec = METHODS[name]
    params = spec.params.model_validate(SETTINGS[name])
    base = torch.randn(6, 5)
    if name in ISOTROPIC:
        theta = base + 2.0 * torch.linalg.qr(torch.randn(6, 5)).Q  # τ = 2·(orthonormal columns)
    else:
        theta = base + torch.randn(6, 5)
    merged = spec.merge("w", base, [theta.clone(), theta.clone()], [0.3, 0.7], params)
    torch.testing.assert_close(merged.tensor, theta, atol=1e-5, rtol=1e-5)
    # and merging copies of the base gives the base
    merged = spec.merge("w", base, [base.clone(), base.clone()], [0.3, 0.7], params)
    torch.testing.assert_close(merged.tensor, base, atol=1e-5, rtol=1e-5)


def test_every_method_is_tested_here():
    assert set(SETTINGS) | {"soup_greedy"} == set(METHODS)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "soup_greedy"])
def test_only_methods_that_say_so_write_into_their_inputs(name):
    """The engine reads inputs as memory maps for a method without overwrites_inputs (a write there would
    copy each page on its own fault), so such a method must leave its θ_i as they are; none writes θ_base."""
    spec = METHODS[name]
    params = spec.params.model_validate(SETTINGS[name])
    base = torch.randn(6, 5)
    thetas = [base + torch.randn(6, 5), base + torch.randn(6, 5)]
    thetas_before, base_before = [t.clone() for t in thetas], base.clone()
    spec.merge("w", base, thetas, [0.3, 0.7], params)
    assert torch.equal(base, base_before)
    if not spec.overwrites_inputs:
        assert all(torch.equal(t, b) for t, b in zip(thetas, thetas_before, strict=True))
