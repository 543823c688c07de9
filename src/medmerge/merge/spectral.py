"""Spectral and LoRA-native merges, one 2-D weight matrix at a time: KnOTS, TSV-M, Iso-C, Iso-CTS, Core Space.

Notation as in medmerge.merge.methods: τ_i = θ_i − θ_base (out, in), w_i the weights. Every SVD runs in
float32 on one tensor's matrices. Embeddings (names matching `EMBEDDING`) and tensors that are not 2-D
(norms, biases) take each method's fallback, documented per function and in docs/merging.md.
The functions have the registry's tensor-function signature and may overwrite their `thetas`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from medmerge.merge import methods
from medmerge.merge.methods import Extras, Merged

EMBEDDING = re.compile(r"(embed[^.]*|wte|wpe|(^|\.)shared|relative_attention_bias)\.weight$")
_GTA = {  # inner task-vector merge → its setting of generalized_task_arithmetic (medmerge.merge.methods)
    "ta": methods.TASK_ARITHMETIC,
    "ties": methods.TIES,
    "dare_linear": methods.DARE_LINEAR,
    "dare_ties": methods.DARE_TIES,
}


def is_matrix(name: str, tensor: torch.Tensor) -> bool:
    """Whether `name` is a 2-D weight matrix the spectral methods decompose (not an embedding table)."""
    return tensor.dim() == 2 and not EMBEDDING.search(name)


def _task_vectors(base: torch.Tensor, thetas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """τ_i = θ_i − θ_base, computed in the storage of θ_i."""
    return [theta.sub_(base) for theta in thetas]


def _relative(weights: Sequence[float]) -> list[float]:
    """w̃_i = n·w_i / Σ_j w_j: unit weights reproduce the papers' unweighted sums."""
    total = float(sum(weights))
    if total == 0:
        raise ValueError("the model weights sum to 0")
    return [len(weights) * w / total for w in weights]


def _rank(s: torch.Tensor, shape) -> int:
    """Numerical rank from descending singular values s (NumPy's matrix_rank tolerance)."""
    if s.numel() == 0:
        return 0
    return int((s > s[0].clamp_min(1e-30) * max(shape) * torch.finfo(s.dtype).eps).sum())


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD of x cut to its numerical rank: directions with σ ≈ 0 are arbitrary, so never kept.

    LAPACK's float32 divide-and-conquer SVD can fail to converge on an ill-conditioned x (Iso-CTS's
    residual after the common subspace is removed, on full-model experts); then x / max|x| is
    decomposed in float64 and σ scaled back.
    """
    try:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        scale = x.abs().max().clamp_min(1e-30)
        u, s, vh = torch.linalg.svd((x / scale).to(torch.float64), full_matrices=False)
        u, s, vh = u.to(x.dtype), (s * scale.to(torch.float64)).to(x.dtype), vh.to(x.dtype)
    r = _rank(s, x.shape)
    return u[:, :r], s[:r], vh[:r]


def _orthogonalize(x: torch.Tensor) -> torch.Tensor:
    """The nearest partial isometry to x: P·Qᵀ from x = P Σ Qᵀ, over the nonzero singular values only
    (orthonormal columns, or rows when wide, when x has full rank; directions x lacks stay out)."""
    p, _, qh = _svd(x)
    return p @ qh


def _mean_fallback(base: torch.Tensor, taus: Sequence[torch.Tensor], weights, lam: float) -> Merged:
    """θ_base + λ·Σ w_i τ_i / Σ w_i: the fallback of TSV-M and Iso-C/CTS for non-matrix tensors."""
    return Merged(methods.linear(taus, weights).mul_(lam).add_(base), {"fallback": "mean"})


def inner_merge(name: str, taus: list[torch.Tensor], weights: Sequence[float], p) -> Merged:
    """The task-vector merge `p.inner` (ta / ties / dare_linear / dare_ties, with p's knobs) of tensors
    taken as task vectors over a zero base; λ included. Consumes `taus`."""
    return _GTA[p.inner](name, torch.zeros_like(taus[0]), taus, weights, p, consume=True)


def _inner_stats(merged: Merged) -> dict[str, object]:
    return {k: v for k, v in merged.stats.items() if k in ("kept", "sign_conflicts")}


def knots(name: str, base, thetas, weights, p, extras: Extras | None = None) -> Merged:
    """KnOTS (Stoica et al., ICLR 2025): one SVD of the column concatenation [τ_1 … τ_n] = U Σ [V_1ᵀ … V_nᵀ]
    (out × n·in), cut to its numerical rank k (rows of σ ≈ 0 are arbitrary: kept, they would take part
    in a TIES trim); the V_iᵀ blocks (k × in) are merged by the task-vector merge `p.inner` (over a zero base,
    with its density / λ), giving V*ᵀ; θ = θ_base + U Σ V*ᵀ. With inner "ta" this is task arithmetic
    exactly (U Σ Σ_i w_i V_iᵀ = Σ_i w_i τ_i). Non-matrix tensors: the inner merge of the τ_i themselves."""
    taus = _task_vectors(base, thetas)
    norms = [float(torch.linalg.vector_norm(t)) for t in taus]
    if not is_matrix(name, base):
        merged = inner_merge(name, taus, weights, p)
        return Merged(
            merged.tensor.add_(base), {"tau_norm": norms, "fallback": p.inner} | _inner_stats(merged)
        )
    cols = base.shape[1]
    u, s, vh = _svd(torch.cat(taus, dim=1))  # vh: (k, n·in), k the numerical rank
    del taus
    blocks = [vh[:, i * cols : (i + 1) * cols].contiguous() for i in range(len(thetas))]
    del vh
    merged = inner_merge(name, blocks, weights, p)
    delta = u.mul_(s) @ merged.tensor
    return Merged(delta.add_(base), {"tau_norm": norms, "rank": int(s.numel())} | _inner_stats(merged))


def tsv_delta(
    taus: Sequence[torch.Tensor], weights: Sequence[float], rank_fraction: float | None
) -> torch.Tensor:
    """TSV-M's merged task matrix: each τ_i = U_i S_i V_iᵀ cut to its top k = ⌊rank_fraction · min(out, in)⌋
    (default fraction 1/n, at least 1) directions; U = [U_1,k … U_n,k], V likewise, S = [w̃_1 S_1,k … ];
    U⊥ = P Qᵀ from U = P Σ Qᵀ, V⊥ likewise (decorrelation); M = U⊥ diag(S) V⊥ᵀ."""
    n = len(taus)
    k = max(1, int(min(taus[0].shape) * (rank_fraction if rank_fraction is not None else 1.0 / n)))
    us, ss, vhs = [], [], []
    for w, tau in zip(_relative(weights), taus, strict=True):
        u, s, vh = _svd(tau)
        us.append(u[:, :k])
        ss.append(s[:k] * w)
        vhs.append(vh[:k])
    u_perp = _orthogonalize(torch.cat(us, dim=1))  # (out, n·k)
    vh_perp = _orthogonalize(torch.cat(vhs, dim=0))  # (n·k, in)
    return (u_perp * torch.cat(ss)) @ vh_perp


def _spectral(name: str, base, thetas, weights, lam: float, delta, *args) -> Merged:
    """θ_base + λ·delta(τ, w, *args) for a weight matrix; θ_base + λ·Σ w_i τ_i / Σ w_i for any other."""
    taus = _task_vectors(base, thetas)
    if not is_matrix(name, base):
        return _mean_fallback(base, taus, weights, lam)
    return Merged(delta(taus, weights, *args).mul_(lam).add_(base))


def tsv(name: str, base, thetas, weights, p, extras: Extras | None = None) -> Merged:
    """TSV-M (Gargiulo et al., CVPR 2025): θ = θ_base + λ·tsv_delta(τ); non-matrix tensors:
    θ_base + λ·Σ w_i τ_i / Σ w_i."""
    return _spectral(name, base, thetas, weights, p.lam, tsv_delta, p.rank_fraction)


def iso_c_delta(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Iso-C's merged task matrix: M = Σ w̃_i τ_i = U S Vᵀ, its spectrum made isotropic: mean(S)·U Vᵀ."""
    total = methods.linear(taus, weights).mul_(len(taus))  # Σ w̃_i τ_i
    u, s, vh = _svd(total)
    return (u @ vh).mul_(s.mean() if s.numel() else 0.0)


def iso_c(name: str, base, thetas, weights, p, extras: Extras | None = None) -> Merged:
    """Iso-C (Marczak et al., 2025): θ = θ_base + λ·mean(σ(M))·U Vᵀ, M = Σ w̃_i τ_i = U S Vᵀ; non-matrix
    tensors: θ_base + λ·Σ w_i τ_i / Σ w_i."""
    return _spectral(name, base, thetas, weights, p.lam, iso_c_delta)


def iso_cts_delta(
    taus: Sequence[torch.Tensor], weights: Sequence[float], common_fraction: float
) -> torch.Tensor:
    """Iso-CTS's merged task matrix (as the authors' code): of the rank budget m = min(out, in), the task-
    specific part gets t = round((m − ⌊m·common_fraction⌋)/n) directions per task and the common subspace
    the c = m − n·t others. Common: the top-c singular triplets of M = Σ w̃_i τ_i. Task i: the top-t of
    its residual (I − U_c U_cᵀ) w̃_i τ_i. All the U's (and V's) side by side, orthogonalized (P Qᵀ); every
    singular value replaced by the mean of the kept ones: mean(S)·U⊥ V⊥ᵀ."""
    n, m = len(taus), min(taus[0].shape)
    per_task = round((m - int(m * common_fraction)) / n)
    common = m - n * per_task
    scaled = [tau.mul_(w) for w, tau in zip(_relative(weights), taus, strict=True)]  # w̃_i τ_i
    u, s, vh = _svd(torch.stack(scaled).sum(0))
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for tau in scaled if per_task else ():
        ut, st, vht = _svd(tau - us[0] @ (us[0].T @ tau))
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    u_perp = _orthogonalize(torch.cat(us, dim=1))
    vh_perp = _orthogonalize(torch.cat(vhs, dim=0))
    kept = torch.cat(ss)
    return (u_perp @ vh_perp).mul_(kept.mean() if kept.numel() else 0.0)


def iso_cts(name: str, base, thetas, weights, p, extras: Extras | None = None) -> Merged:
    """Iso-CTS (Marczak et al., 2025): θ = θ_base + λ·iso_cts_delta(τ); non-matrix tensors:
    θ_base + λ·Σ w_i τ_i / Σ w_i."""
    return _spectral(name, base, thetas, weights, p.lam, iso_cts_delta, p.common_fraction)


def _merge_updates(name: str, updates: list[torch.Tensor], weights, p, spectral: bool) -> Merged:
    """Core Space's inner merge of same-shape updates (cores, or full τ_i in the fallback), λ included:
    a task-vector merge, or tsv / iso_c (`spectral` false: λ·Σ w_i τ_i / Σ w_i instead)."""
    if p.inner in _GTA:
        return inner_merge(name, updates, weights, p)
    if not spectral:
        return _mean_fallback(torch.zeros_like(updates[0]), updates, weights, p.lam)
    delta = tsv_delta(updates, weights, None) if p.inner == "tsv" else iso_c_delta(updates, weights)
    return Merged(delta.mul_(p.lam))


def core_space(name: str, base, thetas, weights, p, extras: Extras | None = None) -> Merged:
    """Core Space merging (Panariello et al., NeurIPS 2025) of LoRA updates τ_i = B_i A_i (B_i carries s):
    B = [B_1 … B_n] = U_B …, A = [A_1; …; A_n] = … V_Aᵀ (reduced SVDs, float32); core M_i = U_Bᵀ B_i A_i V_A
    (R × R, R = Σ r_i); M* = the inner merge of the cores; θ = θ_base + U_B M* V_Aᵀ. U_B U_Bᵀ and V_A V_Aᵀ
    project onto spaces holding every B_i A_i, so linear inner merges equal their full-space result.
    Tensors without factors in every input (not LoRA-adapted, saved replacements, full-model inputs):
    the inner merge of the full τ_i."""
    factors = extras.factors if extras is not None else ()
    if len(factors) != len(thetas) or any(f is None for f in factors) or base.dim() != 2:
        merged = _merge_updates(name, _task_vectors(base, thetas), weights, p, is_matrix(name, base))
        return Merged(merged.tensor.add_(base), {"fallback": "full space"} | _inner_stats(merged))
    del thetas  # the update is rebuilt from the factors
    b_all = torch.cat([b for b, _ in factors], dim=1)  # (out, R)
    a_all = torch.cat([a for _, a in factors], dim=0)  # (R, in)
    if b_all.shape[1] == 0:
        return Merged(base.clone(), {"core_rank": 0})
    u_b = torch.linalg.svd(b_all, full_matrices=False).U  # (out, R′)
    vh_a = torch.linalg.svd(a_all, full_matrices=False).Vh  # (R″, in)
    cores = [(u_b.T @ b) @ (a @ vh_a.T) for b, a in factors]  # (R′, R″) each
    merged = _merge_updates(name, cores, weights, p, spectral=True)
    delta = u_b @ merged.tensor @ vh_a
    return Merged(delta.add_(base), {"core_rank": int(b_all.shape[1])} | _inner_stats(merged))
