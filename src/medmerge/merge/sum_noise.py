"""The Gaussian noise a site adds to its contribution to a secure sum (`statistics: secure+dp`).

Distributed DP. Each of the sites whose noise the guarantee counts on (`noised_sites`, n) adds
N(0, s²) to every coordinate of its contribution (medmerge.merge.from_sums: the gram::, wg::, wd:: terms;
the delta:: terms are the expert's own weights, not data), with

    s = σ · C · w_max / (d · √n),

C the clip of one unit's share of the whole released vector (medmerge.train.private_stats), w_max the
largest |w_i| of the round (public), d the public divisor (SumLayout.scale). The sum over n such sites
carries N(0, σ²C²w_max²/d²) on every coordinate, and one unit of site j moves the sum by at most
|w_j|·C/d ≤ w_max·C/d: a Gaussian mechanism with noise multiplier σ for every site.

What holds when not every site plays its part:
- only n' < n honest noises reach the sum (sites dropped before sending, or sites that collude with
  the coordinator and reveal their own noise): the multiplier is σ·√(n'/n);
- a site's own noise alone (every other party colluding): σ/√n.
So n is set to the number of sites that must survive a round (the secure sum's threshold), not to the
number invited. The ledger is charged with σ (`NoiseRelease`) before anything is released; a refusal
(budget exceeded) raises and releases nothing.

The noise comes from a generator seeded from os.urandom, drawn fresh for each release and never written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medmerge.errors import MedmergeError
from medmerge.merge.from_sums import DELTA, SEP, Contribution, SumLayout


@dataclass(frozen=True)
class NoiseRelease:
    """One noised contribution, as the site's privacy ledger is charged with it
    (medmerge.train.ledger.gaussian_release(sigma, sample_rate, steps, what=..., unit=...))."""

    sigma: float  # noise multiplier of the sum
    sample_rate: float = 1.0  # no subsampling amplification claimed (medmerge.train.private_stats)
    steps: int = 1
    what: str = "statistics gram (secure sum)"
    unit: str = "pair"


Charge = Callable[[NoiseRelease], object]


def ledger_charge(folder: str) -> Charge:
    """A `Charge` writing into the site's privacy ledger (`privacy_ledger.json` in `folder`):
    medmerge.train.ledger's `gaussian_release` and `PrivacyLedger.charge` (the dp branch)."""

    def charge(release: NoiseRelease) -> object:
        from medmerge.train.ledger import PrivacyLedger, gaussian_release  # lands with the DP issue

        ledger = PrivacyLedger.load(folder)
        record = gaussian_release(
            release.sigma, release.sample_rate, release.steps, what=release.what, unit=release.unit
        )
        return ledger.charge(record)

    return charge


def site_noise_std(sigma: float, clip: float, w_max: float, divisor: float, noised_sites: int) -> float:
    """s = σ·C·w_max / (d·√n): one site's share of the sum's N(0, σ²C²w_max²/d²) (module doc)."""
    if not (sigma > 0 and clip > 0 and w_max > 0 and divisor > 0) or noised_sites < 1:
        raise MedmergeError(
            f"noise: sigma {sigma}, clip {clip}, w_max {w_max}, divisor {divisor}, sites {noised_sites} "
            "(expected positive numbers)"
        )
    return sigma * clip * w_max / (divisor * math.sqrt(noised_sites))


def noised_contribution(
    contribution: Contribution,
    *,
    sigma: float,
    clip: float,
    w_max: float,
    layout: SumLayout,
    noised_sites: int,
    charge: Charge,
    unit: str = "pair",
    what: str = "statistics gram (secure sum)",
    generator: torch.Generator | None = None,
) -> Contribution:
    """`contribution` (made with `layout`) with this site's share of the noise on every statistic
    coordinate, after charging the ledger. The divisor d is the layout's public scale: a site's own
    token count (normalise="tokens") depends on its data and is refused. `generator` is for tests only:
    by default a fresh one seeded from os.urandom."""
    if layout.normalise != "none":
        raise MedmergeError("noise: normalise must be 'none' (a public scale); a site's token count is data")
    divisor = layout.scale
    if abs(contribution.weight) > w_max * (1 + 1e-12):
        raise MedmergeError(f"noise: site weight {contribution.weight} above the round's w_max {w_max}")
    std = site_noise_std(sigma, clip, w_max, divisor, noised_sites)
    charge(NoiseRelease(sigma=sigma, what=what, unit=unit))
    if generator is None:
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    noised = Contribution(aliases=dict(contribution.aliases), weight=contribution.weight)
    for name, tensor in contribution.tensors.items():
        if name.partition(SEP)[0] == DELTA:
            noised.tensors[name] = tensor.clone()
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        noised.tensors[name] = tensor.to(torch.float64) + noise.mul_(std)
    return noised
