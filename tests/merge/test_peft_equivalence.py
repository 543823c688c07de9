"""Equivalence with peft.utils.merge_utils where the conventions coincide, and where they do not.

PEFT elects the TIES sign from the unweighted Σ τ̂_i and divides the agreeing weighted sum by the
*count* of agreeing models; medmerge elects from Σ w_i τ̂_i and divides by Σ_{agree} w_i (the TIES
paper's disjoint mean with weights). They coincide when every weight is 1. PEFT's DARE masks come from
torch's global RNG; medmerge's from a per-(seed, tensor, model) generator, so the masks are injected
into PEFT here to compare everything but the random draw.
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from medmerge.merge import methods, sparsify

torch.manual_seed(0)
BASE = torch.randn(12, 9)
THETAS = [BASE + torch.randn(12, 9) for _ in range(3)]
TAUS = [t - BASE for t in THETAS]


def _ours(weights, **kw) -> torch.Tensor:
    return methods.generalized_task_arithmetic(BASE, THETAS, weights, **kw).tensor - BASE


def test_task_arithmetic_matches_peft():
    w = [0.5, 1.5, -0.25]
    torch.testing.assert_close(_ours(w), merge_utils.task_arithmetic(TAUS, torch.tensor(w)))


def test_magnitude_prune_matches_peft():
    w = [0.5, 1.5, 0.25]
    ours = _ours(w, sparsifier="magnitude", density=0.3)
    torch.testing.assert_close(ours, merge_utils.magnitude_prune(TAUS, torch.tensor(w), 0.3))


def test_ties_matches_peft_with_unit_weights():
    ours = _ours([1.0, 1.0, 1.0], sparsifier="magnitude", density=0.4, sign_consensus=True)
    torch.testing.assert_close(ours, merge_utils.ties(TAUS, torch.ones(3), 0.4))


def test_ties_differs_from_peft_with_unequal_weights():
    w = [0.2, 1.0, 3.0]
    ours = _ours(w, sparsifier="magnitude", density=0.4, sign_consensus=True)
    peft = merge_utils.ties(TAUS, torch.tensor(w), 0.4)
    assert float((ours - peft).abs().max()) > 0.1


def _inject_masks(monkeypatch, density: float, seed: int, name: str) -> None:
    masks = iter(
        sparsify.bernoulli(tau, density, sparsify.tensor_generator(seed, name, i))[1].to(tau.dtype)
        for i, tau in enumerate(TAUS)
    )
    monkeypatch.setattr(merge_utils.torch, "bernoulli", lambda probs: next(masks))


def test_dare_linear_matches_peft_given_the_same_masks(monkeypatch):
    w = [0.5, 1.5, 0.25]
    ours = _ours(w, sparsifier="bernoulli", density=0.3, seed=5, name="layer.w")
    _inject_masks(monkeypatch, 0.3, 5, "layer.w")
    torch.testing.assert_close(ours, merge_utils.dare_linear(TAUS, torch.tensor(w), 0.3))


def test_dare_ties_matches_peft_given_the_same_masks_and_unit_weights(monkeypatch):
    ours = _ours([1.0] * 3, sparsifier="bernoulli", density=0.3, sign_consensus=True, seed=5, name="w")
    _inject_masks(monkeypatch, 0.3, 5, "w")
    torch.testing.assert_close(ours, merge_utils.dare_ties(TAUS, torch.ones(3), 0.3))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_pruning_keeps_the_same_entries_as_peft(density):
    tau = TAUS[0]
    ours, _ = sparsify.magnitude(tau, density)
    torch.testing.assert_close(ours, merge_utils.magnitude_based_pruning(tau, density))
