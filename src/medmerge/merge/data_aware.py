"""Data-aware merges from statistics the sites share (never their data): RegMean and Fisher merging.

The engine hands each call the statistics of every input for the tensor being merged
(`Extras.statistics`, read lazily from each expert's statistics.safetensors, medmerge.merge.statistics).
A tensor for which some input has no statistic falls back to the weighted average Σ w_i θ_i / Σ w_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medmerge.merge import methods
from medmerge.merge.methods import Extras, Merged

RIDGE = 1e-6  # relative ridge of the RegMean solve, pulling directions no site saw towards the average


def _statistic(extras: Extras | None, kind: str, n: int) -> list[torch.Tensor] | None:
    """The `kind` statistic of each of the n inputs, or None unless every input has one."""
    found = [s.get(kind) for s in extras.statistics] if extras is not None else []
    if len(found) != n or any(t is None for t in found):
        return None
    return found


def regmean_solve(
    thetas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], weights: Sequence[float], alpha: float
) -> torch.Tensor:
    """RegMean (Jin et al., ICLR 2023) for W_i (out, in) applied as y = W x, G_i (in, in) = Σ x xᵀ:

    G̃_i = α G_i + (1 − α) diag(G_i)  (off-diagonal entries scaled by α);
    W*ᵀ = (Σ w_i G̃_i + εI)⁻¹ (Σ w_i G̃_i W_iᵀ + ε W̄ᵀ),  W̄ = Σ w_i W_i / Σ w_i,
    ε = RIDGE · mean(diag Σ w_i G̃_i): the least-squares merge min_W Σ_i w_i ‖X_i Wᵀ − X_i W_iᵀ‖² (α = 1),
    with input directions that no site's Gram covers (and only those, up to ε) set to the average.
    Solved in float64 by Cholesky (torch.linalg.solve if the sum is not positive definite, e.g. with
    negative weights); returned in float32.
    """
    size = grams[0].shape[0]
    total = torch.zeros(size, size, dtype=torch.float64)
    rhs = torch.zeros(size, thetas[0].shape[0], dtype=torch.float64)
    for w, theta, gram in zip(weights, thetas, grams, strict=True):
        g = gram.to(torch.float64, copy=True)
        if alpha != 1.0:
            diagonal = g.diagonal().clone()
            g.mul_(alpha).diagonal().copy_(diagonal)
        total.add_(g, alpha=w)
        rhs.addmm_(g, theta.to(torch.float64).T, alpha=w)
        del g
    epsilon = RIDGE * float(total.diagonal().mean())
    average = methods.linear(thetas, weights).to(torch.float64)
    if not epsilon > 0:  # no site saw any input: nothing to weigh by
        return average.to(torch.float32)
    total.diagonal().add_(epsilon)
    rhs.add_(average.T, alpha=epsilon)
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
    else:
        solution = torch.linalg.solve(total, rhs)
    return solution.T.to(torch.float32).contiguous()


def regmean(name: str, base, thetas, weights, p, extras: Extras | None = None) -> Merged:
    """RegMean on 2-D weights whose inputs all have a Gram matrix `gram::<name>` (Linear layers);
    every other tensor (embeddings, norms, biases, layers without statistics): Σ w_i θ_i / Σ w_i."""
    grams = _statistic(extras, "gram", len(thetas))
    if grams is None or thetas[0].dim() != 2:
        return Merged(methods.linear(thetas, weights), {"fallback": "linear"})
    return Merged(regmean_solve(thetas, grams, weights, p.alpha))


def fisher_average(
    thetas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float], epsilon: float
) -> torch.Tensor:
    """Fisher merging (Matena & Raffel, NeurIPS 2022), elementwise:
    θ = Σ_i w_i (F_i + ε) θ_i / Σ_i w_i (F_i + ε), ε an absolute floor; where the denominator is 0
    (ε = 0 and no model has Fisher mass there), the weighted average."""
    numerator = torch.zeros_like(thetas[0], dtype=torch.float32)
    denominator = torch.zeros_like(numerator)
    for w, theta, fisher in zip(weights, thetas, fishers, strict=True):
        f = fisher.to(torch.float32).add(epsilon).mul_(w)
        numerator.addcmul_(f, theta)
        denominator.add_(f)
        del f
    empty = denominator == 0
    out = numerator.div_(denominator.masked_fill_(empty, 1.0))
    if bool(empty.any()):
        out = torch.where(empty, methods.linear(thetas, weights), out)
    return out


def fisher(name: str, base, thetas, weights, p, extras: Extras | None = None) -> Merged:
    """Fisher merging of every tensor whose inputs all have `fisher::<name>`; others: Σ w_i θ_i / Σ w_i."""
    fishers = _statistic(extras, "fisher", len(thetas))
    if fishers is None:
        return Merged(methods.linear(thetas, weights), {"fallback": "linear"})
    return Merged(fisher_average(thetas, fishers, weights, p.epsilon))
