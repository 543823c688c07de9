"""A site's privacy ledger in the federation (medmerge.train.ledger): one `privacy_ledger.json` in the
site's folder, charged by every DP release the site makes, composed by the accountant.

    expert          DP-SGD of the site's expert (train step), as "expert"
    FedAvg round k  DP-SGD again in every round, on the same records, as "FedAvg round k": each round's
                    σ is calibrated to the config's target ε for its own steps, and the rounds compose
                    (three rounds at ε 1 spend the accountant's ε of the three histories, not 1)
    statistics      a secure+dp sum (secagg) or a noised statistic: `gaussian_release(σ, q, what=…,
                    unit=unit(site))` charged with `charge(site, release)`

A release that would take the site's composed ε past `privacy.budget` is refused before it runs:
OverBudget (code over_budget on the wire; the reason in the site's own log). The site reports its ledger
in its evaluate reply (`summary`: ε, δ, unit, budget, and per release its name, kind, mechanism, ε alone
and accountant history (σ, q, steps)); the verdict recomputes the composition from those histories.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from medmerge.federated.wire import OverBudget
from medmerge.train.ledger import OverBudgetError, PrivacyLedger, Release

Site = Any  # medmerge.federated.site.Site (not imported: site.py imports this module)


def ledger_args(site: Site, what: str) -> dict[str, Any]:
    """train_expert's arguments that charge a DP training to the site's ledger as release `what`
    (none where the site's training is not DP)."""
    return {"ledger": site.out, "release": what} if site.config.train.privacy is not None else {}


@contextlib.contextmanager
def budget_refusal(site: Site) -> Iterator[None]:
    """A release over `privacy.budget` inside becomes OverBudget (code over_budget, reason logged)."""
    try:
        yield
    except OverBudgetError as exc:
        raise OverBudget(f"site {site.name}: {str(exc).splitlines()[0]}") from None


def charge(site: Site, release: Release) -> Release:
    """Charge `release` to the site's ledger under its `privacy.budget` and δ (`privacy.delta`, else the
    δ its first release set); OverBudget to refuse. Returns the recorded release."""
    privacy = site.config.train.privacy
    budget, delta = (privacy.budget, privacy.delta) if privacy is not None else (None, None)
    with budget_refusal(site):
        return PrivacyLedger.load(site.out, budget=budget, delta=delta).charge(release)


def unit(site: Site) -> str:
    """The unit the site's ledger protects ("pair" while it holds no release)."""
    return PrivacyLedger.load(site.out).unit or "pair"


def summary(site: Site) -> dict[str, Any] | None:
    """The site's ledger as it reports it (PrivacyLedger.summary; None: no DP release yet)."""
    return PrivacyLedger.load(site.out).summary()
