"""RegMean and Fisher merging from sums across sites: what each site adds into a secure sum, and the merge.

RegMean (medmerge.merge.data_aware.regmean_solve) needs no single site's Gram, only sums over sites.
With W_i = W₀ + ΔW_i (W₀ the public base weight), G̃ = αG + (1 − α)·diag(G) and site weights w_i:

    W*(α)ᵀ = W₀ᵀ + (S̃ + λI)⁻¹ (α·S_WG + (1 − α)·S_WD + λ·ΔW̄)ᵀ,   S̃ = α·S_G + (1 − α)·diag(S_G),
    S_G = Σ w_i G_i,  S_WG = Σ w_i ΔW_i G_i,  S_WD = Σ w_i ΔW_i diag(G_i),  ΔW̄ = Σ w_i ΔW_i / Σ w_i,
    λ = ridge · mean(diag S̃),

which is today's solve (Σ w_i G̃_i + λI)⁻¹(Σ w_i G̃_i W_iᵀ + λW̄ᵀ) rewritten: the W₀ terms cancel, because
(S̃ + λI)⁻¹(S̃ + λI)W₀ᵀ = W₀ᵀ. For fixed w_i the four sums give W*(α) for every α. Only deltas travel, so
the sums stay small where the experts are close to the base (LoRA).

Fisher merging (data_aware.fisher_average), with ε its floor: θ* = W₀ + (S_FΔ + ε·S_Δ) / (S_F + ε·Σ w_i),
S_F = Σ w_i F_i, S_FΔ = Σ w_i F_i ⊙ ΔW_i, S_Δ = Σ w_i ΔW_i.

Every statistic term is divided by a public `scale` (the same at every site; it cancels in both merges
except in λ, which is relative) or, with `normalise="tokens"`, by the site's own token count (which
changes the merge: each site then weighs by w_i alone, not by how many tokens it read).

Names of the summed tensors (`<kind>::<weight name>`, float64):
    gram::<stored>   upper triangle of w·G/scale, row by row (in·(in+1)/2 values; a Gram is symmetric)
    wg::<weight>     w·ΔW·G/scale (out, in)           wd::<weight>  w·ΔW·diag(G)/scale (out, in)
    fisher::<weight> w·F/scale (out, in)               fd::<weight>  w·F⊙ΔW/scale (out, in)
    delta::<weight>  w·ΔW (out, in): not data, but what the ridge and the fallback average need
A weight reads the Gram stored under `aliases.get(weight, weight)` (q/k/v share one; medmerge.site_stats).

The coordinator projects a summed Gram (after noise or quantization it need not be positive semi-definite)
onto the PSD cone (eigenvalues clipped at 0) before adding λI; a sum that already has a Cholesky factor
is PSD and left as it is, so with exact sums the merge is today's merge (tests/merge/test_from_sums.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from medmerge.errors import MedmergeError
from medmerge.merge.data_aware import RIDGE

SEP = "::"
GRAM, WG, WD, FISHER, FD, DELTA = "gram", "wg", "wd", "fisher", "fd", "delta"
Normalise = Literal["none", "tokens"]


def key(kind: str, name: str) -> str:
    return f"{kind}{SEP}{name}"


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row: n(n+1)/2 values."""
    n = matrix.shape[0]
    rows, cols = torch.triu_indices(n, n)
    return matrix[rows, cols]


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle `pack_symmetric` gave."""
    n = int(((8 * packed.numel() + 1) ** 0.5 - 1) / 2)
    if n * (n + 1) // 2 != packed.numel():
        raise MedmergeError(f"packed Gram of {packed.numel()} values: not n(n+1)/2 for any n")
    rows, cols = torch.triu_indices(n, n)
    out = torch.zeros(n, n, dtype=packed.dtype)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out


@dataclass(frozen=True)
class SumLayout:
    """What a site adds into the sum (the same at every site; public).

    diagonal: add S_WD (needed for α < 1; without it only α = 1 can be merged).
    scale: public divisor of every statistic term. normalise: "none" (today's RegMean) or "tokens"
    (each site divides by its own token count instead of `scale`).
    input_scales: public D_m (in,) per stored Gram name: the terms travel in the coordinates x' = x / D,
    i.e. D⁻¹GD⁻¹, ΔW·G·D⁻¹ and ΔW·diag(G)·D⁻¹ (the coordinator multiplies D back). Real activations
    have a few dimensions 10³–10⁴ times larger than the rest; without this a quantized sum (one range
    per tensor) keeps nothing of the small ones (bench/secure_regmean.py).
    """

    diagonal: bool = True
    scale: float = 1.0
    normalise: Normalise = "none"
    input_scales: Mapping[str, torch.Tensor] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise MedmergeError(f"scale: {self.scale} (expected a positive public divisor)")
        if self.normalise not in ("none", "tokens"):
            raise MedmergeError(f"normalise: {self.normalise!r} (expected 'none' or 'tokens')")

    def divisor(self, tokens: int | None) -> float:
        if self.normalise == "tokens":
            if not tokens:
                raise MedmergeError("normalise: tokens needs the site's token count (statistics.json tokens)")
            return float(tokens)
        return self.scale


def regmean_terms(
    gram: torch.Tensor,
    deltas: Mapping[str, torch.Tensor],
    weight: float,
    divisor: float,
    diagonal: bool,
    scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One stored Gram's terms: gram:: (packed) and, for each weight reading it, wg:: (and wd::).

    `gram` (in, in) is the site's G of the stored name; `deltas` maps each weight reading that input
    (the stored name and its aliases) to its ΔW (out, in); `scale` the public D of that input (or None).
    """
    g = gram.to(torch.float64) * (weight / divisor)
    inverse = 1.0 / scale.to(torch.float64) if scale is not None else None
    terms: dict[str, torch.Tensor] = {}
    packed = g * inverse[:, None] * inverse[None, :] if inverse is not None else g
    terms[key(GRAM, "")] = pack_symmetric(packed)
    for name, delta in deltas.items():
        d = delta.to(torch.float64)
        terms[key(WG, name)] = d @ g if inverse is None else (d @ g) * inverse
        if diagonal:
            terms[key(WD, name)] = d * (g.diagonal() if inverse is None else g.diagonal() * inverse)
    return terms


@dataclass
class Contribution:
    """The tensors one site adds into the sum (names in the module doc), and the public structure."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # weight → stored Gram name (public)
    weight: float = 1.0


def site_contribution(
    deltas: Mapping[str, torch.Tensor],
    weight: float,
    *,
    grams: Mapping[str, torch.Tensor] | None = None,
    aliases: Mapping[str, str] | None = None,
    fishers: Mapping[str, torch.Tensor] | None = None,
    tokens: int | None = None,
    layout: SumLayout | None = None,
) -> Contribution:
    """A site's contribution to the sums, from its statistics, its expert's deltas and its weight w.

    deltas: ΔW = W − W₀ of every tensor the expert changes (absent: zero); grams: stored name → G (in, in)
    (Σ x xᵀ as `medmerge stats` writes it, or its noised release); aliases: weight → stored name;
    fishers: weight → F (out, in); tokens: the site's token count (normalise="tokens" only).
    A weight is merged by RegMean where it has a Gram, by Fisher merging where it has a Fisher, else
    averaged; only 2-D weights take statistics.
    """
    layout = layout or SumLayout()
    aliases = dict(aliases or {})
    divisor = layout.divisor(tokens)
    out = Contribution(aliases=aliases, weight=float(weight))
    for name, delta in deltas.items():
        out.tensors[key(DELTA, name)] = delta.to(torch.float64) * weight
    readers: dict[str, dict[str, torch.Tensor]] = {}
    for name, delta in deltas.items():
        stored = aliases.get(name, name)
        if grams is not None and stored in grams and delta.dim() == 2:
            readers.setdefault(stored, {})[name] = delta
    scales = layout.input_scales or {}
    for stored, gram in (grams or {}).items():
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise MedmergeError(f"gram of {stored}: shape {tuple(gram.shape)} (expected a square matrix)")
        terms = regmean_terms(
            gram, readers.get(stored, {}), weight, divisor, layout.diagonal, scales.get(stored)
        )
        out.tensors[key(GRAM, stored)] = terms.pop(key(GRAM, ""))
        out.tensors.update(terms)
    for name, fisher in (fishers or {}).items():
        if name not in deltas:
            continue  # a weight no expert changes: nothing to weigh
        f = fisher.to(torch.float64) * (weight / divisor)
        out.tensors[key(FISHER, name)] = f
        out.tensors[key(FD, name)] = f * deltas[name].to(torch.float64)
    return out


def add_contributions(contributions: list[Contribution]) -> tuple[dict[str, torch.Tensor], float]:
    """The exact sums of `contributions` (what a secure sum yields without quantization) and Σ w_i.

    Every site must send the same names and the same public aliases."""
    first = contributions[0]
    sums = {k: t.clone() for k, t in first.tensors.items()}
    for c in contributions[1:]:
        if set(c.tensors) != set(sums) or c.aliases != first.aliases:
            raise MedmergeError("contributions: sites sent different tensor names or aliases")
        for k, t in c.tensors.items():
            sums[k].add_(t)
    return sums, sum(c.weight for c in contributions)


def project_psd(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The nearest (Frobenius) positive semi-definite matrix to a symmetric `matrix`, and whether it
    changed: a matrix with a Cholesky factor is returned as it is; else eigenvalues are clipped at 0."""
    _, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return matrix, False
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0)) @ vectors.T, True


@dataclass
class SumsMerge:
    """The merged weights (float32, by weight name; only the tensors the sums cover) and what was done."""

    weights: dict[str, torch.Tensor]
    projected: list[str] = field(default_factory=list)  # stored Grams that were not PSD after the sum
    method: dict[str, str] = field(default_factory=dict)  # weight → "regmean" | "fisher" | "linear"


def _readers(sums: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for k in sums:
        kind, _, name = k.partition(SEP)
        if kind == WG:
            found.setdefault(aliases.get(name, name), []).append(name)
    return found


def regmean_from_sums(
    sums: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    total_weight: float,
    alpha: float,
    *,
    aliases: Mapping[str, str] | None = None,
    ridge: float = RIDGE,
    noise_std: float = 0.0,
    input_scales: Mapping[str, torch.Tensor] | None = None,
) -> SumsMerge:
    """RegMean at `alpha` from the sums (module doc); W₀ from `base` (weight name → tensor);
    `input_scales` the layout's public D (S_G = D S_G' D, S_WG = S_WG' D, S_WD = S_WD' D).

    The ridge is λ_rel·I + λ_n·D² (D = 1 without scales), λ_rel = ridge · mean diag S̃ as today. For a
    noised sum, `noise_std` s is the sum's noise per released coordinate (σ·C·w_max/d, public), and in
    the released coordinates x / D, where that noise is isotropic, λ_n = max(2s√in, 10 s√(out·in) /
    ‖ΔW̄·D‖_F) (out: the rows of every weight reading the input): the first is the noise Gram's spectral
    norm, the second keeps the noise the W·G sums carry into the solution, at most ‖N‖_F / λ_n, under a
    tenth of the average delta ΔW̄ = S_Δ / Σw — so under heavy noise the merge tends to the average, not
    to noise. The PSD projection is made in those coordinates too. Weights with a delta:: but no wg::
    get the average W₀ + S_Δ / Σ w_i.
    """
    if total_weight == 0:
        raise MedmergeError("regmean from sums: the weights sum to 0")
    if not 0.0 <= alpha <= 1.0:
        raise MedmergeError(f"alpha: {alpha} (expected 0 ≤ α ≤ 1)")
    aliases = dict(aliases or {})
    out = SumsMerge(weights={})
    for k, s_delta in sums.items():
        kind, _, name = k.partition(SEP)
        if kind == DELTA:
            out.weights[name] = (base[name].to(torch.float64) + s_delta / total_weight).float()
            out.method[name] = "linear"
    for stored, names in sorted(_readers(sums, aliases).items()):
        released = unpack_symmetric(sums[key(GRAM, stored)].to(torch.float64))  # S_G' (D⁻¹ S_G D⁻¹)
        size = released.shape[0]
        scale = (input_scales or {}).get(stored)
        d = scale.to(torch.float64) if scale is not None else torch.ones(size, dtype=torch.float64)
        diagonal = released.diagonal().clone()
        tilde = released.mul_(alpha)
        tilde.diagonal().copy_(diagonal)
        tilde, changed = project_psd(tilde)
        if changed:
            out.projected.append(stored)
        tilde = tilde * d[:, None] * d[None, :]
        floor = 0.0
        if noise_std > 0:
            averages = torch.cat([sums[key(DELTA, n)].to(torch.float64) for n in names]) / total_weight
            spread = float((averages * d).norm()) or 1.0
            rows = averages.shape[0]
            floor = max(2 * noise_std * size**0.5, 10 * noise_std * (rows * size) ** 0.5 / spread)
        ridge_diagonal = ridge * float(tilde.diagonal().mean()) + floor * d * d  # (in,)
        if not float(ridge_diagonal.max()) > 0:
            continue  # no site saw any input: the average stays
        tilde.diagonal().add_(ridge_diagonal)
        rhs = []
        for name in names:
            right = sums[key(WG, name)].to(torch.float64) * alpha
            if alpha != 1.0:
                if key(WD, name) not in sums:
                    raise MedmergeError(f"{name}: α = {alpha} needs the wd:: sum (layout diagonal=True)")
                right = right + sums[key(WD, name)].to(torch.float64) * (1.0 - alpha)
            right = right * d
            average = sums[key(DELTA, name)].to(torch.float64) / total_weight
            rhs.append(right + average * ridge_diagonal)
        stacked = torch.cat(rhs).T  # (in, Σ out)
        factor, info = torch.linalg.cholesky_ex(tilde)
        if int(info) == 0:
            solved = torch.cholesky_solve(stacked, factor)
        else:
            solved = torch.linalg.solve(tilde, stacked)
        start = 0
        for name, right in zip(names, rhs, strict=True):
            rows = right.shape[0]
            delta = solved[:, start : start + rows].T
            out.weights[name] = (base[name].to(torch.float64) + delta).float().contiguous()
            out.method[name] = "regmean"
            start += rows
    return out


def fisher_from_sums(
    sums: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], total_weight: float, epsilon: float
) -> SumsMerge:
    """Fisher merging from the sums (module doc). A summed Fisher is clipped at 0 (the projection onto
    the non-negative orthant, as the PSD projection for Grams); where S_F + ε Σw is 0, the average."""
    if total_weight == 0:
        raise MedmergeError("fisher from sums: the weights sum to 0")
    out = SumsMerge(weights={})
    for k, s_delta in sums.items():
        kind, _, name = k.partition(SEP)
        if kind != DELTA:
            continue
        w0 = base[name].to(torch.float64)
        average = s_delta / total_weight
        if key(FISHER, name) not in sums:
            out.weights[name], out.method[name] = (w0 + average).float(), "linear"
            continue
        s_f = sums[key(FISHER, name)].to(torch.float64)
        if bool((s_f < 0).any()):
            out.projected.append(name)
            s_f = s_f.clamp(min=0)
        denominator = s_f + epsilon * total_weight
        numerator = sums[key(FD, name)].to(torch.float64) + epsilon * s_delta
        empty = denominator == 0
        merged = numerator / denominator.masked_fill(empty, 1.0)
        merged = torch.where(empty, average, merged)
        out.weights[name], out.method[name] = (w0 + merged).float(), "fisher"
    return out
