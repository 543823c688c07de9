"""Merge methods as pure functions of tensors: one tensor name at a time, float32 in, float32 out.

Notation: θ_i is model i's tensor, θ_base the base model's, τ_i = θ_i − θ_base its task vector, w_i its
weight. Each function takes the tensors of ONE parameter (any shape, all the same shape) and returns
the merged tensor of that shape; `Merged` variants also return per-tensor statistics for the manifest.
The formulas and where mergekit / PEFT differ are in docs/merging.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from medmerge.merge import sparsify

Sparsifier = Literal["none", "magnitude", "bernoulli", "breadcrumbs", "della"]
CONSENSUS_CHUNK = 1 << 17  # entries per step of the TIES sign consensus (its scratch fits in cache)
# entries per step of task arithmetic, DARE without consensus, SLERP and Model Stock: 1 MiB of float32,
# so a step's few live blocks stay in cache (2¹⁸ measured fastest of 2¹⁶–2¹⁹ on the 360M bench model)
ELEMENTWISE_CHUNK = 1 << 18


@dataclass(frozen=True)
class Merged:
    """A merged tensor and its statistics (plain floats / lists, JSON-ready)."""

    tensor: torch.Tensor
    stats: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Extras:
    """What a method may read beyond θ for one tensor name, one entry per input, in input order
    (the engine fills the fields its spec asks for: `needs_statistics`, `needs_factors`)."""

    statistics: tuple[dict[str, torch.Tensor | None], ...] = ()  # {kind: float32 tensor or None}
    factors: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] = ()  # (B′, A′), θ_i − θ_base = B′A′


def _weights(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Weights as a (N, 1, …, 1) float32 tensor that broadcasts against a stack of N tensors like `like`."""
    return torch.tensor(list(weights), dtype=torch.float32).reshape(-1, *([1] * like.dim()))


def linear(thetas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted average θ = Σ_i w_i θ_i / Σ_i w_i (equal weights: the uniform model soup).

    Accumulates in place, so memory stays at one extra tensor whatever the number of models.
    """
    total = float(sum(weights))
    if total == 0:
        raise ValueError("linear merge: the weights sum to 0")
    out = torch.mul(thetas[0], weights[0] / total).to(torch.float32)
    for theta, w in zip(thetas[1:], weights[1:], strict=True):
        out.add_(theta, alpha=w / total)
    return out


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    rowwise: bool = False,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> Merged:
    """Spherical linear interpolation of two tensors (Shoemake 1985), flattened or row by row.

    Ω = arccos(⟨v0, v1⟩ / (‖v0‖‖v1‖));  θ = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1.
    The angle comes from the normalised vectors but the unnormalised ones are interpolated, so norms
    are interpolated too. ‖v0‖², ‖v1‖² and ⟨v0, v1⟩ are summed in float64 over blocks of
    ELEMENTWISE_CHUNK entries, and θ is written block by block: two reads of each input, no temporaries.
    Where |cos Ω| > `dot_threshold` (nearly colinear or antipodal) or a norm is below `eps`, falls back
    to lerp (1−t)·v0 + t·v1. t=0 gives v0 and t=1 gives v1 exactly.
    `rowwise`: one angle per slice of the first axis (per output row of a weight matrix) instead of one per
    tensor (the usual definition, and mergekit's).
    """
    if t == 0.0 or t == 1.0:
        return Merged((v1 if t == 1.0 else v0).to(torch.float32).clone(), {"cos": None, "lerp": 0.0})
    rows = v0.shape[0] if rowwise and v0.dim() >= 1 else 1
    a, b = v0.to(torch.float32).reshape(rows, -1), v1.to(torch.float32).reshape(rows, -1)  # (R, m)
    blocks = _blocks(*a.shape)
    # ‖a‖², ‖b‖² and ⟨a, b⟩ per row, summed (float64) over cache-sized blocks: one read of each input
    one_row = rows == 1
    sums = torch.zeros(3, rows, dtype=torch.float64)
    for block in blocks:
        x, y = a[block], b[block]
        sums[0, block[0]] += _row_dots(x, x, one_row)
        sums[1, block[0]] += _row_dots(y, y, one_row)
        sums[2, block[0]] += _row_dots(x, y, one_row)
    na, nb = sums[0].sqrt(), sums[1].sqrt()
    degenerate = (na <= eps) | (nb <= eps)
    cos = (sums[2] / (na.clamp_min(eps) * nb.clamp_min(eps))).clamp_(-1.0, 1.0)
    use_lerp = degenerate | (cos.abs() > dot_threshold)
    omega = torch.acos(torch.where(use_lerp, 0.0, cos))
    sin_omega = torch.where(use_lerp, 1.0, torch.sin(omega))
    c0 = torch.where(use_lerp, 1.0 - t, torch.sin((1 - t) * omega) / sin_omega).to(torch.float32)
    c1 = torch.where(use_lerp, t, torch.sin(t * omega) / sin_omega).to(torch.float32)
    out = torch.empty(a.shape, dtype=torch.float32)
    for block in blocks:  # θ = c0·a + c1·b, block by block (one read of each input, one write)
        r = block[0]
        if rows == 1:
            torch.mul(a[block], float(c0[0]), out=out[block]).add_(b[block], alpha=float(c1[0]))
        else:
            torch.mul(a[block], c0[r, None], out=out[block]).addcmul_(b[block], c1[r, None])
    return Merged(
        out.reshape(v0.shape),
        {"cos": float(cos.mean()), "lerp": int(torch.count_nonzero(use_lerp)) / use_lerp.numel()},
    )


def _sparsify(
    tau: torch.Tensor,
    how: Sparsifier,
    density: float,
    gamma: float,
    epsilon: float,
    rescale: bool,
    generator: Callable[[], sparsify.TensorRandom],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sparsify τ in place (the caller owns it). The sparsifiers that rank entries: "none" and
    "bernoulli" run entry by entry in `_elementwise_task_arithmetic` instead."""
    if density >= 1.0 and how != "breadcrumbs":
        return tau, None
    if how == "magnitude":
        return sparsify.magnitude(tau, density, inplace=True)
    if how == "breadcrumbs":
        return sparsify.breadcrumbs(tau, density, gamma, inplace=True)
    if how == "della":
        return sparsify.della(tau, density, epsilon, generator(), rescale, inplace=True)
    raise ValueError(f"unknown sparsifier {how!r}")


def _per_model(density: float | Sequence[float], n: int) -> list[float]:
    """`density` as one float per model: a number repeated n times, or a sequence of exactly n."""
    if isinstance(density, int | float):
        return [float(density)] * n
    densities = [float(d) for d in density]
    if len(densities) != n:
        raise ValueError(f"density: {len(densities)} values for {n} models (expected one per model)")
    return densities


def generalized_task_arithmetic(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsifier: Sparsifier = "none",
    density: float | Sequence[float] = 1.0,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    rescale: bool = True,
    sign_consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    seed: int = 0,
    name: str = "",
    consume: bool = False,
) -> Merged:
    """The one task-arithmetic family; task_arithmetic, ties, dare_*, breadcrumbs*, della* are settings.

    1. τ_i = θ_i − θ_base, sparsified to τ̂_i by `sparsifier` (see medmerge.merge.sparsify) at
       `density`: one number for every model, or one per model (d_i, in input order; mergekit's
       per-model `density`).
    2. Without sign consensus: δ = Σ_i w_i τ̂_i, divided by Σ_i w_i if `normalize`.
       With sign consensus (TIES): γ = sign(Σ_i w_i τ̂_i) (γ = +1 where the sum is 0); entry j of model i
       agrees when sign(τ̂_ij) = γ_j (a trimmed zero never agrees); disjoint weighted mean
       δ_j = Σ_{i agrees} w_i τ̂_ij / Σ_{i agrees} w_i   (0 where no model agrees).
    3. θ = θ_base + λ·δ.
    Random sparsifiers draw from `tensor_generator(seed, name, i)`, independent of tensor order.
    `consume`: the θ_i may be overwritten (τ_i is computed in their storage), saving N tensors of memory.
    Stats: ‖τ_i‖_F per model, fraction of entries kept per model, and (with consensus) the fraction of
    entries where some kept τ̂_i opposes the elected sign ("sign_conflicts"; with non-negative weights,
    the entries where kept τ̂ of different models have opposite signs).
    """
    densities = _per_model(density, len(thetas))
    if sparsifier in ("none", "bernoulli"):  # every step is entry by entry: one chunked pass
        draws = [sparsify.tensor_generator(seed, name, i) for i in range(len(thetas))]
        if sparsifier == "none":
            densities = [1.0] * len(thetas)
        return _elementwise_task_arithmetic(
            base, thetas, weights, densities, rescale, sign_consensus, normalize, lam, draws
        )
    stats: dict[str, object] = {"tau_norm": [], "kept": []}
    base = base.to(torch.float32)
    weighted_sum = torch.zeros(base.shape, dtype=torch.float32)  # contiguous: viewed flat below
    sparse: list[torch.Tensor] = []
    for i, theta in enumerate(thetas):
        tau = theta.sub_(base) if consume else theta - base
        stats["tau_norm"].append(float(torch.linalg.vector_norm(tau)))
        tau_hat, keep = _sparsify(
            tau,
            sparsifier,
            densities[i],
            gamma,
            epsilon,
            rescale,
            lambda i=i: sparsify.tensor_generator(seed, name, i),
        )
        stats["kept"].append(1.0 if keep is None else int(torch.count_nonzero(keep)) / max(keep.numel(), 1))
        weighted_sum.add_(tau_hat, alpha=weights[i])
        if sign_consensus:
            sparse.append(tau_hat)
        del tau, keep, tau_hat
    if not sign_consensus:
        total = float(sum(weights))
        if normalize and total != 0:
            weighted_sum.div_(total)
        delta = weighted_sum
    else:
        conflicts = 0
        n = base.numel()
        flat_sum, flat_sparse = weighted_sum.view(-1), [tau_hat.reshape(-1) for tau_hat in sparse]
        for start in range(0, n, CONSENSUS_CHUNK):  # chunks stay in cache; scratch is chunk-sized
            chunk = slice(start, start + CONSENSUS_CHUNK)  # δ over it, in place of the sum
            conflicts += _disjoint_mean(flat_sum[chunk], [t[chunk] for t in flat_sparse], weights)
        sparse.clear()
        stats["sign_conflicts"] = conflicts / max(n, 1)
        delta = weighted_sum
    if lam != 1.0:
        delta.mul_(lam)
    return Merged(delta.add_(base), stats)


@dataclass(frozen=True)
class TaskVectorMerge:
    """One setting of `generalized_task_arithmetic` (its sparsifier and whether it elects signs), as a
    tensor function: (name, θ_base, θ_i, w_i, params) → Merged, the params' fields (lam, density, gamma,
    epsilon, seed, rescale, normalize: those the method has) passed as the function's keyword arguments."""

    sparsifier: Sparsifier
    consensus: bool

    def __call__(self, name: str, base, thetas, weights, p, *, consume: bool = False) -> Merged:
        knobs = {k: v for k, v in p if k in _TASK_VECTOR_KNOBS}  # e.g. not spectral methods' `inner`
        return generalized_task_arithmetic(
            base,
            thetas,
            weights,
            sparsifier=self.sparsifier,
            sign_consensus=self.consensus,
            name=name,
            consume=consume,
            **knobs,
        )


_TASK_VECTOR_KNOBS = ("density", "gamma", "epsilon", "rescale", "normalize", "lam", "seed")
# the task-vector merges, each stated once (the registry's entries and spectral's inner merges use them)
TASK_ARITHMETIC = TaskVectorMerge("none", False)
TIES = TaskVectorMerge("magnitude", True)
DARE_LINEAR = TaskVectorMerge("bernoulli", False)
DARE_TIES = TaskVectorMerge("bernoulli", True)
BREADCRUMBS = TaskVectorMerge("breadcrumbs", False)
BREADCRUMBS_TIES = TaskVectorMerge("breadcrumbs", True)
DELLA = TaskVectorMerge("della", True)
DELLA_LINEAR = TaskVectorMerge("della", False)


def _elementwise_task_arithmetic(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    rescale: bool,
    sign_consensus: bool,
    normalize: bool,
    lam: float,
    draws: Sequence[sparsify.TensorRandom],
) -> Merged:
    """`generalized_task_arithmetic` where each τ̂_i entry depends on its own entry only (no drop where
    d_i ≥ 1, else a DARE drop), so that every step, the TIES sign election and disjoint mean included,
    is entry by entry: computed over chunks of ELEMENTWISE_CHUNK entries whose scratch stays in cache
    (one read of each input and one write of the output, against a dozen passes over whole tensors).
    Each entry goes through the same float32 operations, in the same order, as the whole-tensor path, and
    the masks are the same draws (TensorRandom.stream), so the result is the same to the bit; ‖τ_i‖ is
    √Σ over chunks of their squared norms (float64)."""
    n = base.numel()
    flat_base = base.to(torch.float32).reshape(-1)
    flats = [theta.to(torch.float32).reshape(-1) for theta in thetas]
    drops = [d < 1.0 for d in densities]
    streams = [draw.stream() if drop else None for draw, drop in zip(draws, drops, strict=True)]
    total = float(sum(weights))
    divide = normalize and total != 0 and not sign_consensus
    out = torch.empty(n, dtype=torch.float32)
    size = min(n, ELEMENTWISE_CHUNK)
    # τ̂_i of the current chunk: one buffer reused, or one per model when the consensus reads them again
    buffers = [torch.empty(size) for _ in (thetas if sign_consensus else thetas[:1])]
    squares, kept, conflicts = [0.0] * len(thetas), [0] * len(thetas), 0
    for start in range(0, n, ELEMENTWISE_CHUNK):
        stop = min(start + ELEMENTWISE_CHUNK, n)
        acc, b = out[start:stop].zero_(), flat_base[start:stop]
        taus = [buffer[: stop - start] for buffer in buffers]
        for i, theta in enumerate(flats):
            tau = taus[i if sign_consensus else 0]
            torch.sub(theta[start:stop], b, out=tau)
            squares[i] += float(torch.linalg.vector_norm(tau)) ** 2
            if drops[i]:
                keep = torch.from_numpy(streams[i].random(stop - start, dtype=np.float32)) < densities[i]
                kept[i] += int(torch.count_nonzero(keep))
                tau.mul_(keep)
                if rescale and densities[i] > 0:
                    tau.div_(densities[i])
            acc.add_(tau, alpha=weights[i])
        if sign_consensus:
            conflicts += _disjoint_mean(acc, taus, weights)
        elif divide:
            acc.div_(total)
        if lam != 1.0:
            acc.mul_(lam)
        acc.add_(b)
    stats = {
        "tau_norm": [math.sqrt(x) for x in squares],
        "kept": [k / max(n, 1) if drop else 1.0 for k, drop in zip(kept, drops, strict=True)],
    }
    if sign_consensus:
        stats["sign_conflicts"] = conflicts / max(n, 1)
    return Merged(out.view(base.shape), stats)


def _disjoint_mean(weighted_sum: torch.Tensor, taus: Sequence[torch.Tensor], weights: Sequence[float]) -> int:
    """TIES on one chunk, in place: γ = sign(Σ_i w_i τ̂_i) (+1 at 0), then δ_j = Σ_{i agrees} w_i τ̂_ij /
    Σ_{i agrees} w_i (0 where none agrees) written over `weighted_sum`; the τ̂_i are overwritten with
    τ̂_i γ. The same float32 operations, in the same order, as generalized_task_arithmetic's consensus.
    Returns the number of entries where some kept τ̂_i opposes γ."""
    gamma = weighted_sum.ge_(0).mul_(2).sub_(1)  # γ ∈ {−1, +1}, in place of the sum
    numerator = torch.zeros_like(gamma)  # Σ_{agree} w_i |τ̂_i|
    denominator = torch.zeros_like(gamma)  # Σ_{agree} w_i
    conflict = torch.zeros(gamma.shape, dtype=torch.bool)
    for w, tau_hat in zip(weights, taus, strict=True):
        agreement = tau_hat.mul_(gamma)  # > 0 agrees with γ, < 0 opposes it
        conflict.logical_or_(agreement < 0)
        denominator.add_(agreement > 0, alpha=w)
        numerator.add_(agreement.relu_(), alpha=w)  # Σ w_i·relu(τ̂_i γ) = γ · Σ_{agree} w_i τ̂_i
    numerator.mul_(gamma).div_(denominator.masked_fill_(denominator == 0, 1.0))  # 0 where none agrees
    gamma.copy_(numerator)
    return int(torch.count_nonzero(conflict))


def model_stock(base: torch.Tensor, thetas: Sequence[torch.Tensor], filter_wise: bool = False) -> Merged:
    """Model Stock (Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024).

    cos φ = mean over pairs i<j of ⟨τ_i, τ_j⟩ / (‖τ_i‖‖τ_j‖) (‖·‖ clamped ≥ 1e-6, cos clamped to [−1, 1]),
    per tensor (per row with `filter_wise`); t = N·cos φ / (1 + (N−1)·cos φ);
    θ = t·(Σ_i θ_i / N) + (1 − t)·θ_base (t = 0 where 1 + (N−1)·cos φ ≈ 0). Needs N ≥ 2 models.
    Unweighted, as in the paper.
    """
    n = len(thetas)
    if n < 2:
        raise ValueError("model_stock needs at least 2 models")
    per_row = filter_wise and base.dim() >= 2
    rows = (lambda x: x.reshape(-1, x.shape[-1])) if per_row else (lambda x: x.reshape(1, -1))
    r_base, r_thetas = rows(base), [rows(theta) for theta in thetas]  # (R, m) views
    blocks = _blocks(*r_base.shape)
    # ‖τ_i‖² and ⟨τ_i, τ_j⟩ per row, summed (float64) over blocks of ≈ ELEMENTWISE_CHUNK entries: no τ_i
    # is held whole
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    squares = torch.zeros(n, r_base.shape[0], dtype=torch.float64)
    dots = torch.zeros(len(pairs), r_base.shape[0], dtype=torch.float64)
    out = torch.empty(r_base.shape, dtype=torch.float32)
    for block in blocks:
        mean = torch.mul(r_thetas[0][block], 1.0 / n, out=out[block])  # linear(θ_i), t applied below
        for theta in r_thetas[1:]:
            mean.add_(theta[block], alpha=1.0 / n)
        taus = [theta[block] - r_base[block] for theta in r_thetas]
        for i, tau in enumerate(taus):
            squares[i, block[0]] += _row_dots(tau, tau, not per_row)
        for k, (i, j) in enumerate(pairs):
            dots[k, block[0]] += _row_dots(taus[i], taus[j], not per_row)
    norms = squares.sqrt().to(torch.float32)  # (n, R)
    cos = torch.zeros_like(norms[0])
    for k, (i, j) in enumerate(pairs):
        c = dots[k].to(torch.float32) / (norms[i] * norms[j]).clamp_min(1e-6)
        cos += c.clamp(-1.0, 1.0)
    cos /= len(pairs)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # opposing updates: keep the base there (as mergekit)
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator)).reshape(-1, 1)  # (R, 1)
    for block in blocks:  # θ = t·linear(θ_i) + (1 − t)·θ_base, block by block
        rows_t = t[block[0]] if per_row else t
        out[block].mul_(rows_t).addcmul_(r_base[block], 1 - rows_t)
    return Merged(
        out.reshape(base.shape),
        {"cos": float(cos.mean()), "t": float(t.mean()), "tau_norm": [float(x.norm()) for x in norms]},
    )


def _row_dots(x: torch.Tensor, y: torch.Tensor, one_row: bool) -> torch.Tensor:
    """⟨x_r, y_r⟩ for each row r of two (R, m) blocks; for a tensor taken as one row, a BLAS dot of the
    flat blocks (vecdot would build the elementwise product first)."""
    return torch.dot(x.reshape(-1), y.reshape(-1)) if one_row else torch.linalg.vecdot(x, y)


def _blocks(rows: int, cols: int) -> list[tuple[slice, slice]]:
    """(rows, columns) slices of ≈ ELEMENTWISE_CHUNK entries covering an (R, m) matrix: blocks of whole
    rows, or column ranges when there is one row."""
    if rows == 1:
        return [
            (slice(0, 1), slice(s, min(s + ELEMENTWISE_CHUNK, cols)))
            for s in range(0, cols, ELEMENTWISE_CHUNK)
        ]
    step = max(1, ELEMENTWISE_CHUNK // max(cols, 1))
    return [(slice(s, min(s + step, rows)), slice(None)) for s in range(0, rows, step)]


def karcher(
    thetas: Sequence[torch.Tensor], weights: Sequence[float], max_iter: int = 10, tol: float = 1e-5
) -> Merged:
    """Karcher (Fréchet) mean on the unit sphere, norms averaged separately (Karcher, "Riemannian center
    of mass and mollifier smoothing", CPAM 1977; the model-merging form of mergekit's `karcher`).

    u_i = θ_i/‖θ_i‖ (flattened). Start from x = normalised Σ w_i u_i; iterate: log map
    v_i = α_i/sin α_i · (u_i − cos α_i · x), α_i = arccos⟨x, u_i⟩ (v_i = 0 when α_i ≈ 0);
    g = Σ w_i v_i / Σ w_i;
    stop when ‖g‖ < tol; exp map x ← cos‖g‖·x + sin‖g‖·g/‖g‖. Result: x · Σ w_i‖θ_i‖ / Σ w_i.
    Zero tensors are skipped (their norm still enters the mean norm); all-zero input gives zero.
    """
    total = float(sum(weights))
    norms = [float(theta.norm()) for theta in thetas]
    mean_norm = sum(w * n for w, n in zip(weights, norms, strict=True)) / total
    live = [
        (w, theta.reshape(-1) / n) for w, theta, n in zip(weights, thetas, norms, strict=True) if n > 1e-12
    ]
    if not live:
        return Merged(torch.zeros_like(thetas[0], dtype=torch.float32), {"iterations": 0})
    live_total = sum(w for w, _ in live)
    x = torch.zeros_like(live[0][1])
    for w, u in live:
        x.add_(u, alpha=w)
    if float(x.norm()) < 1e-12:  # antipodal inputs: start from the first
        x = live[0][1].clone()
    x.div_(x.norm())
    g = torch.empty_like(x)  # the tangent step, one buffer for every iteration
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        g.zero_()
        for w, u in live:
            cos = float(x @ u)
            alpha = math.acos(max(-1.0, min(1.0, cos)))
            if alpha > 1e-7:  # g += c·(u − cos·x), c = w α / (sin α Σw)
                c = w * alpha / math.sin(alpha) / live_total
                g.add_(u, alpha=c).add_(x, alpha=-c * cos)
        g_norm = float(g.norm())
        if g_norm < tol:
            break
        x.mul_(math.cos(g_norm)).add_(g, alpha=math.sin(g_norm) / g_norm)
        x.div_(x.norm())
    return Merged(x.mul_(mean_norm).reshape(thetas[0].shape), {"iterations": iterations})
