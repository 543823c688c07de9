"""Bounds on what one dishonest site can do to a merge, for the coordinator: pure functions on checked
adapters (federated.checks) and on the numbers sites report. Each returns a typed record that names every
site and module it refused or clipped, for the verdict.

Norms (screen_norms). Per adapted weight m, site i's update norm ‖ΔW_im‖_F = s·‖B A‖_F, computed from
the r×r Grams ‖BA‖_F² = trace((BᵀB)(AAᵀ)) without forming ΔW. Its reference is the median over ALL
sites of that module's norms when there are ≥ 3 sites (robust while honest sites are a majority: the
median is an honest site's norm or lies between two), and the OTHER site's norm when there are 2 (the
median of two is their mean, which a ×1000 site drags up to 500×: no outlier would ever be seen). A
norm above K_NORM × reference is an outlier. A site whose median ratio over its modules exceeds K_NORM
(an outsized update: ×1000) has its whole update scaled back to the other sites' typical size (one
factor, so the relative sizes of its modules are kept); each module still above K_NORM × reference is
then clipped to the reference norm (its direction kept). After the screen every ‖ΔW_im‖ ≤ K_NORM ·
reference_m. With `refuse_share`, a site that is an outlier in more than that share of its modules is
refused whole instead.
(bench/poisoning.py: clipping each module of a ×1000 adapter to the reference norm, rather than one
scale for the whole adapter, moved the chosen TIES merge by +0.012 nats/token: an honest adapter's
module norms range over 0.64–1.46× the median, and TIES's trimming reads magnitudes.)
With 2 sites there is no majority: the rule bounds each site to K_NORM × the other's norm, but which of
two disagreeing sites is honest cannot be told (a site sending a tiny update caps the other's).

Directions (direction_cosines, screen_directions). A sign-flipped adapter (−ΔW) has honest norms, but
its cosine with every honest site's update is the honest cosine negated. For each pair of sites, the
median over modules of cos(ΔW_im, ΔW_jm), from the factors: ⟨B_i A_i, B_j A_j⟩_F = trace((B_iᵀB_j)(A_j
A_iᵀ)). A site whose cosine is below `threshold` with more than half of the other sites is refused
(needs ≥ 3 sites and an honest majority; the cosine of the update with the SUM of the others is no
good: with one flipped site among three, an honest site's "others" cancel to noise).

Validation (validation_screen). Each expert alone scored at the OTHER sites, against the base: an expert
whose median loss change there (nats/token, expert − base) exceeds `margin` makes the others' data worse
than no merge at all and is refused. The coordinator must send one validation request carrying "base"
and every expert (federated.site's `_validation` already scores named peers and "base") after the
exchange, and pass the replies' {nll_sum, tokens} here.

Statistics (screen_gram_scales): each site's trace(G)/tokens per weight (checks.StatisticsSummary)
against the median of the sites (or the other site), refused above K_GRAM × or below 1/K_GRAM ×.

Search objective (bounded_objective): a site's reported nll/token is clipped to [0, ln V + margin] and
its token weight to K_TOKENS × the reference (median, or the other site's) before the sites' numbers
are combined: one site's numbers move the objective by a bounded amount.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from medmerge.federated.checks import CheckedAdapter, LoraFactors

# outlier above K_NORM × the reference norm. bench/poisoning.py, three real SmolLM2-135M experts (210
# modules): an honest module's norm is at most 1.46× the median of the three, 1.88× the other's of a pair
K_NORM = 3.0
# two sites' updates disagree below this cosine. bench/poisoning.py: honest pairs' median cosines over
# modules 0.06 (MedQuAD ~ GenMedGPT) to 0.23 (MedQuAD ~ MedQuAD): a flipped site's are these negated.
# This rests on the sites sharing the study's seed (the same LoRA A init); different seeds give ≈ 0.
DIRECTION_THRESHOLD = 0.0
# refused when alone it worsens the other sites' validation loss vs the base by more (nats/token, median
# over the other sites). bench/poisoning.py: honest experts alone at another site −0.36 … +0.053 (a
# MedQuAD expert on GenMedGPT questions); the sign-flipped expert +2.77 … +3.50, the ×1000 one +15
VALIDATION_MARGIN = 0.5
# mean ‖x‖² outside [1/K_GRAM, K_GRAM] × the reference is refused. bench/poisoning.py --statistics, the
# three real experts' Grams (64 questions each): honest ratios to the median 0.62–1.31
K_GRAM = 4.0
K_TOKENS = 2.0  # a site's token weight is at most K_TOKENS × the reference


def reference(values: Mapping[str, float], site: str) -> float:
    """The robust reference a site's value is compared with: the median over all sites (≥ 3 sites) or
    the other site's value (2 sites); for one site, its own."""
    if len(values) == 2:
        return next(v for s, v in values.items() if s != site)
    return statistics.median(values.values())


# ------------------------------------------------------------------------------------------------ norms
def lora_norm(f: LoraFactors) -> float:
    """‖s·B·A‖_F from the r×r Grams: s·√trace((BᵀB)(AAᵀ)) (float64; the product of two PSD matrices
    has a non-negative trace, clamped at 0 against rounding)."""
    b, a = f.b.double(), f.a.double()
    return abs(f.scale) * math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


def module_norms(adapters: Mapping[str, CheckedAdapter]) -> dict[str, dict[str, float]]:
    """{site: {base weight name: ‖ΔW‖_F}}."""
    return {site: {m: lora_norm(f) for m, f in a.factors.items()} for site, a in adapters.items()}


@dataclass(frozen=True)
class NormFlag:
    site: str
    module: str
    norm: float
    reference: float

    @property
    def ratio(self) -> float:
        return self.norm / self.reference if self.reference > 0 else math.inf


@dataclass(frozen=True)
class NormScreen:
    """The norm screen's verdict: every outlier (site, module) as sent, the sites whose whole update was
    rescaled (site → the factor), the factor each module's ΔW is multiplied by (< 1; every module of a
    rescaled site, and each outlier clipped to its reference), and the sites refused whole."""

    k: float
    flags: list[NormFlag] = field(default_factory=list)
    scales: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    rescaled: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One line per refused site and per site whose update was rescaled or clipped, for the verdict."""
        out = [f"site {s}: refused by the norm screen ({why})" for s, why in self.refused.items()]
        for site, scales in self.scales.items():
            mine = [f for f in self.flags if f.site == site]
            worst = max(mine, key=lambda f: f.ratio)
            whole = self.rescaled.get(site)
            clipped = sum(1 for v in scales.values() if v != whole)
            head = (
                f"ΔW scaled by {whole:.3g} (its modules' norms were a median {1 / whole:.3g}× the reference)"
                if whole is not None
                else "ΔW not rescaled"
            )
            out.append(
                f"site {site}: {head}; {clipped} module(s) clipped to the reference norm; {len(mine)} "
                f"outlier(s) as sent, the largest {worst.ratio:.3g}× the reference ({worst.module})"
            )
        return out


def screen_norms(
    norms: Mapping[str, Mapping[str, float]], k: float = K_NORM, refuse_share: float | None = None
) -> NormScreen:
    """The norm screen (module doc) over {site: {module: ‖ΔW‖_F}}. ratio = norm / reference per module;
    a ratio > k is an outlier. A site with outliers is, with `refuse_share`, refused where they exceed
    that share of its modules. Otherwise its update is bounded in two steps: where the median of its
    ratios over all its modules, ρ, exceeds k (the whole update is outsized, e.g. ×1000), every module
    is scaled by 1/ρ, which keeps the relative sizes of its modules (the ×1000 adapter comes back as
    sent before the ×1000); then each module still above k × its reference is clipped to the reference
    norm. After the screen every module's ‖ΔW‖ ≤ k × its reference."""
    if k < 1:
        raise ValueError(f"k = {k}: expected ≥ 1")
    ratios: dict[str, dict[str, float]] = {site: {} for site in norms}
    flags = []
    for module in sorted({m for n in norms.values() for m in n}):
        values = {s: n[module] for s, n in norms.items() if module in n}
        for site, norm in values.items():
            ref = reference(values, site)
            flag = NormFlag(site, module, norm, ref)
            ratios[site][module] = flag.ratio
            if flag.ratio > k:
                flags.append(flag)
    scales: dict[str, dict[str, float]] = {}
    refused: dict[str, str] = {}
    rescaled: dict[str, float] = {}
    for site, mine in ((s, [f for f in flags if f.site == s]) for s in norms):
        if not mine:
            continue
        if refuse_share is not None and len(mine) > refuse_share * len(norms[site]):
            median = statistics.median(f.ratio for f in mine)
            refused[site] = (
                f"‖ΔW‖ above {k:g}× the reference in {len(mine)} of {len(norms[site])} modules, "
                f"median {median:.3g}×"
            )
            continue
        typical = statistics.median(ratios[site].values())
        whole = 1 / _others_ratio(norms, site) if typical > k else 1.0
        scales[site] = {m: whole for m in ratios[site]} if whole < 1 else {}
        for module, ratio in ratios[site].items():
            if ratio * whole > k:
                scales[site][module] = 1 / ratio  # to the reference norm
        if whole < 1:
            rescaled[site] = whole
    return NormScreen(k, flags, scales, refused, rescaled)


def _others_ratio(norms: Mapping[str, Mapping[str, float]], site: str) -> float:
    """ρ: the median over `site`'s modules of its norm / the median of the OTHER sites' norms there — how
    many times the others' size its update is (the others only: its own outsized norms do not pull the
    reference up, as a median over three sites that includes it would)."""
    ratios = []
    for module, norm in norms[site].items():
        others = [n[module] for s, n in norms.items() if s != site and module in n]
        ref = statistics.median(others) if others else norm
        ratios.append(norm / ref if ref > 0 else math.inf)
    return statistics.median(ratios)


def clip_factors(adapter: CheckedAdapter, scales: Mapping[str, float]) -> CheckedAdapter:
    """`adapter` with ΔW of each module in `scales` multiplied by its factor (B scaled)."""
    factors = {
        m: LoraFactors(f.a, f.b * scales[m], f.scale) if m in scales else f
        for m, f in adapter.factors.items()
    }
    return CheckedAdapter(adapter.site, factors, adapter.dtypes)


# ------------------------------------------------------------------------------------------- directions
def direction_cosines(adapters: Mapping[str, CheckedAdapter]) -> dict[tuple[str, str], float]:
    """{(site i, site j): median over the modules both adapt of cos(ΔW_im, ΔW_jm)}, i < j in the order
    given; a module where either ΔW is 0 is left out (no module left: 0)."""
    sites, out = list(adapters), {}
    for x, first in enumerate(sites):
        for second in sites[x + 1 :]:
            cosines = []
            for module in sorted(set(adapters[first].factors) & set(adapters[second].factors)):
                f, g = adapters[first].factors[module], adapters[second].factors[module]
                ff, gg, fg = _inner(f, f), _inner(g, g), _inner(f, g)
                if ff > 0 and gg > 0:
                    cosines.append(fg / math.sqrt(ff * gg))
            out[(first, second)] = statistics.median(cosines) if cosines else 0.0
    return out


def _inner(f: LoraFactors, g: LoraFactors) -> float:
    """⟨s_f B_f A_f, s_g B_g A_g⟩_F = s_f s_g trace((B_fᵀB_g)(A_g A_fᵀ)), float64."""
    bf, bg, af, ag = f.b.double(), g.b.double(), f.a.double(), g.a.double()
    return f.scale * g.scale * float(((bf.T @ bg) * (af @ ag.T)).sum())


def screen_directions(
    cosines: Mapping[tuple[str, str], float], threshold: float = DIRECTION_THRESHOLD
) -> dict[str, str]:
    """{site: reason} for every site whose direction cosine with MORE THAN HALF of the other sites is
    below `threshold`. An honest majority keeps honest sites in: a flipped site disagrees with every
    honest one, an honest site only with the dishonest ones. With 2 sites nothing can be attributed
    (each disagrees with half of… the one other): nothing is refused; use validation_screen."""
    sites = sorted({s for pair in cosines for s in pair})
    refused = {}
    for site in sites:
        mine = {(b if a == site else a): c for (a, b), c in cosines.items() if site in (a, b)}
        against = sorted(o for o, c in mine.items() if c < threshold)
        if len(mine) >= 2 and 2 * len(against) > len(mine):
            worst = min(mine.values())
            refused[site] = (
                f"its ΔW points against {len(against)} of the {len(mine)} other sites' (median cosine over "
                f"modules down to {worst:.3f} < {threshold:g})"
            )
    return refused


# ---------------------------------------------------------------------------------- both, in one call
@dataclass(frozen=True)
class Screened:
    """What screen_adapters keeps: the adapters to merge and forward (outlier modules clipped), the sites
    refused (site → one line), and the lines for the verdict."""

    adapters: dict[str, CheckedAdapter]
    refused: dict[str, str]
    lines: list[str]
    norms: NormScreen
    cosines: dict[tuple[str, str], float]


def screen_adapters(
    checked: Mapping[str, CheckedAdapter],
    k: float = K_NORM,
    refuse_share: float | None = None,
    threshold: float = DIRECTION_THRESHOLD,
) -> Screened:
    """The norm screen, then the direction screen on what it kept (module doc), over the sites' checked
    adapters: the coordinator's step between checks.validate_adapter and checks.canonical_adapter."""
    norms = screen_norms(module_norms(checked), k, refuse_share)
    kept = {s: clip_factors(a, norms.scales.get(s, {})) for s, a in checked.items() if s not in norms.refused}
    cosines = direction_cosines(kept)
    flipped = screen_directions(cosines, threshold)
    refused = dict(norms.refused) | {
        s: f"refused by the direction screen ({why})" for s, why in flipped.items()
    }
    lines = norms.lines() + [f"site {s}: {why}" for s, why in refused.items() if s in flipped]
    adapters = {s: a for s, a in kept.items() if s not in flipped}
    return Screened(adapters, refused, lines, norms, cosines)


# ------------------------------------------------------------------------------------------- validation
Numbers = Mapping[str, float]  # {"nll_sum": Σ nll (nats), "tokens": answer tokens}


def validation_screen(
    scored: Mapping[str, Mapping[str, Numbers]], margin: float = VALIDATION_MARGIN
) -> dict[str, float | str]:
    """{expert: median over the OTHER scoring sites of (loss(expert) − loss(base)), nats/token}, and
    for every expert above `margin` a reason instead, prefixed "refused: " (use `refusals`).

    scored: {scoring site: {"base": numbers, <expert>: numbers, …}}: each site's validation numbers of
    the base and of each expert alone; a site's own expert is not counted."""
    experts = sorted({m for models in scored.values() for m in models if m != "base"})
    out: dict[str, float | str] = {}
    for expert in experts:
        changes = [
            _per_token(models[expert]) - _per_token(models["base"])
            for site, models in scored.items()
            if site != expert and expert in models and "base" in models
        ]
        if not changes:
            continue
        change = statistics.median(changes)
        out[expert] = (
            f"refused: alone it worsens the other sites' validation loss by {change:+.4f} nats/token "
            f"(median over {len(changes)} site(s), margin {margin:g})"
            if change > margin
            else change
        )
    return out


def refusals(screen: Mapping[str, float | str]) -> dict[str, str]:
    """The refused entries of validation_screen's result: {site: reason}."""
    return {s: v.removeprefix("refused: ") for s, v in screen.items() if isinstance(v, str)}


def _per_token(numbers: Numbers) -> float:
    return float(numbers["nll_sum"]) / max(float(numbers["tokens"]), 1.0)


# ------------------------------------------------------------------------------------------- statistics
def screen_gram_scales(summaries: Mapping[str, Mapping[str, float]], k: float = K_GRAM) -> dict[str, str]:
    """{site: reason} for every site whose trace(G)/tokens of some weight (checks.StatisticsSummary
    .mean_sq_norm) lies outside [1/k, k] × the reference (median over sites, or the other site)."""
    refused: dict[str, str] = {}
    for name in sorted({n for s in summaries.values() for n in s}):
        values = {s: v[name] for s, v in summaries.items() if name in v}
        for site, value in values.items():
            ref = reference(values, site)
            if site not in refused and ref > 0 and not (ref / k <= value <= ref * k):
                refused[site] = f"Gram of {name}: mean ‖x‖² {value:.4g}, {value / ref:.3g}× the reference"
    return refused


# ---------------------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class BoundedObjective:
    """The search objective from bounded site numbers, and which site's numbers were bounded."""

    value: float
    clipped: dict[str, str]  # site → what was bounded


def bounded_objective(
    numbers: Mapping[str, Numbers],
    kind: Literal["tokens", "sites", "worst_site"],
    vocab_size: int,
    margin: float = 5.0,
    k: float = K_TOKENS,
) -> BoundedObjective:
    """The objective (nats/token) of the sites' validation numbers, each site's bounded first: its mean
    nll/token clipped to [0, ln(vocab_size) + margin] (a uniform guess scores ln V; no loss is negative)
    and, for "tokens", its token weight clipped to k × the reference (median over sites, or the other
    site's). kind: tokens = weighted mean, sites = mean over sites, worst_site = max over sites (which
    no site can lower: a dishonest site can only raise it, i.e. flatten the search)."""
    if not numbers:
        raise ValueError("no site numbers")
    upper, means, weights, clipped = math.log(vocab_size) + margin, {}, {}, {}
    for site, n in numbers.items():
        tokens, nll = float(n["tokens"]), float(n["nll_sum"])
        if not (math.isfinite(tokens) and math.isfinite(nll)) or tokens < 1:
            raise ValueError(f"site {site}: nll_sum {nll!r}, tokens {tokens!r}: expected finite, tokens ≥ 1")
        mean = nll / tokens
        means[site] = min(max(mean, 0.0), upper)
        weights[site] = tokens
        if means[site] != mean:
            clipped[site] = f"nll/token {mean:.4g} clipped to [0, {upper:.4g}]"
    if kind == "tokens":
        raw = dict(weights)
        for site in weights:
            cap = k * reference(raw, site)
            if weights[site] > cap:
                weights[site] = cap
                clipped[site] = (clipped.get(site, "") + "; " if site in clipped else "") + (
                    f"token weight {raw[site]:g} capped at {cap:g}"
                )
        value = sum(means[s] * weights[s] for s in means) / sum(weights.values())
    elif kind == "sites":
        value = sum(means.values()) / len(means)
    else:
        value = max(means.values())
    return BoundedObjective(value, clipped)
