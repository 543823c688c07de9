"""One privacy ledger per site: every differentially private release it makes, composed by Opacus.

A site's releases all draw on the same records: its DP expert (DP-SGD), each FedAvg round it trains
(DP-SGD again, on the same data), noised statistics (a Gaussian mechanism). Each is a sequence of
Poisson-subsampled Gaussian mechanisms, an accountant history [(σ, q, steps)]: σ the noise multiplier
(noise std / sensitivity C), q the sampling rate (1 for a release over every record), steps how many
times it was applied. The site's guarantee is the composition of all of them:

    ε_site(δ) = accountant ε of  history_1 ++ history_2 ++ … ++ history_k   at the site's δ

- RDP (`rdp`): Rényi DP composes exactly by adding each mechanism's RDP curve; the sum is converted to
  (ε, δ) once (Opacus `RDPAccountant`). Heterogeneous histories are exact.
- PRV (`prv`, default): Opacus's `PRVAccountant` discretises each mechanism's privacy-loss random
  variable and convolves them (`compose_heterogeneous`, Gopi et al. 2021), so heterogeneous releases
  compose numerically too; it returns the upper end of its ε estimate (error ≤ 0.01).

Composition is never "the largest ε": three FedAvg rounds at ε = 1 each spend the composed ε of the
three histories (more than 1, less than 3). Every release must protect the same unit (pair or group:
a group-level guarantee is not a pair-level one and vice versa), and the ledger refuses a release that
would take ε_site past `budget`, before the work where the caller can say what it plans (`check`).

File `privacy_ledger.json` in the site's folder, written atomically under a lock:
    {"format": 1, "delta": δ, "accountant": "prv", "unit": "group", "unit_words": "...",
     "budget": 8.0 | null, "releases": [{what, when, mechanism, unit, unit_words, history,
     delta, epsilon, accountant}, ...]}
Each release's `epsilon` is its ε alone at the ledger's δ (for reading; the composition uses histories).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from medmerge.errors import MedmergeError
from medmerge.manifest import write_json_atomic

LEDGER_FILE = "privacy_ledger.json"
FORMAT = 1
Unit = Literal["pair", "group"]
Accountant = Literal["prv", "rdp"]
Entry = tuple[float, float, int]  # (σ, q, steps)
Kind = Literal["expert", "fedavg", "statistics", "other"]
UNIT_WORDS = {"pair": "one question–answer pair"}


class OverBudgetError(MedmergeError):
    """A release refused because it would take the site's composed ε past `privacy.budget` (the
    federation answers it with code over_budget)."""


def kind_of(what: str) -> Kind:
    """A release's kind from its name where the caller gave none: "expert", "FedAvg round 3", …"""
    low = what.lower()
    if low.startswith("expert"):
        return "expert"
    if low.startswith("fedavg"):
        return "fedavg"
    return "statistics" if "statistic" in low or "sum" in low else "other"


def spent_epsilon(history: list[Entry] | tuple[Entry, ...], delta: float, accountant: str) -> float:
    """ε of the composed Poisson-subsampled Gaussian steps in `history` [(σ, q, steps)], for δ (Opacus).

    0 for an empty history; ∞ when an entry has no noise (σ = 0 with q > 0).
    """
    from medmerge.extras import require

    require("privacy (DP accounting)", "opacus")
    from opacus.accountants import create_accountant

    entries = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not entries:
        return 0.0
    if any(s <= 0 and q > 0 for s, q, _ in entries):
        return math.inf
    import numpy as np

    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    with np.errstate(divide="ignore", invalid="ignore"):  # PRV at q = 1 takes log(1 − q) = −∞ (harmless)
        return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class Release:
    """One DP release of a site: what it was, by which mechanism, over which unit, and its history."""

    what: str  # "expert", "FedAvg round 3", "statistics gram (secure sum)"
    mechanism: str  # "DP-SGD (Opacus)", "Gaussian mechanism"
    unit: Unit
    history: tuple[Entry, ...]  # accountant history [(σ, q, steps)]
    unit_words: str = ""  # the unit in words: "one MedQuAD focus topic and all its questions"
    when: float = 0.0  # unix time it was charged (0: not yet)
    epsilon: float | None = None  # ε of this release alone at `delta` (filled when charged)
    delta: float | None = None
    accountant: str | None = None
    kind: Kind | None = None  # expert | fedavg | statistics | other (from `what` where not given)

    def __post_init__(self) -> None:
        if self.kind is None:
            object.__setattr__(self, "kind", kind_of(self.what))
        if not self.history:
            raise MedmergeError(f"release {self.what!r}: empty accountant history (nothing was released)")
        for sigma, q, steps in self.history:
            if not (math.isfinite(sigma) and sigma > 0):
                raise MedmergeError(
                    f"release {self.what!r}: noise multiplier {sigma} (a DP release needs σ > 0)"
                )
            if not 0 < q <= 1 or int(steps) < 1:
                raise MedmergeError(
                    f"release {self.what!r}: sample rate {q} / steps {steps} (expected 0 < q ≤ 1, steps ≥ 1)"
                )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "history": [list(h) for h in self.history]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Release:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["history"] = tuple((float(s), float(q), int(n)) for s, q, n in fields.get("history", ()))
        return cls(**fields)


def gaussian_release(
    sigma: float,
    sample_rate: float = 1.0,
    steps: int = 1,
    *,
    what: str = "statistics",
    unit: Unit = "pair",
    unit_words: str = "",
    kind: Kind = "statistics",
) -> Release:
    """The release of a Gaussian mechanism: a sum whose sensitivity is C (each unit's contribution
    clipped to L2 norm ≤ C), released with N(0, σ²C²) noise on every coordinate, over a Poisson sample
    of the units at rate `sample_rate` (1: every unit), `steps` times. For noised statistics
    (clipped Gram / Fisher sums) and secure sums carrying the noise in shares (distributed DP: what
    counts is the total noise σC on the sum). Charge it with `PrivacyLedger.charge`.

    A secure sum with distributed noise (secagg's `secure+dp`): σ = the noise multiplier the sum of the
    ≥ t surviving shares is calibrated to, q = 1 (every unit of the site is in the sum), steps = 1 per
    sum released; unit as the site's ledger (`PrivacyLedger.unit`)."""
    return Release(
        what=what,
        kind=kind,
        mechanism="Gaussian mechanism" + (" (Poisson-subsampled)" if sample_rate < 1 else ""),
        unit=unit,
        unit_words=unit_words or UNIT_WORDS.get(unit, ""),
        history=((float(sigma), float(sample_rate), int(steps)),),
    )


@dataclass
class PrivacyLedger:
    """A site's ledger (module doc); `load` it, `check` a planned release, `charge` a done one."""

    folder: Path
    delta: float | None = None  # the site's δ: set by the first release's caller
    accountant: Accountant = "prv"
    budget: float | None = None  # cap on ε_site(delta); None = no cap
    unit: Unit | None = None
    unit_words: str = ""
    releases: list[Release] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.folder / LEDGER_FILE

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        budget: float | None = None,
        delta: float | None = None,
        accountant: Accountant | None = None,
    ) -> PrivacyLedger:
        """The ledger of a site folder (an empty one where none was written yet). `budget`, where
        given, replaces the recorded cap (the site's current config decides); `delta` and `accountant`
        are taken where the ledger has no release yet, and must agree with it otherwise."""
        folder = Path(folder)
        ledger = cls(folder=folder)
        if ledger.path.is_file():
            ledger = cls._read(folder)
        if budget is not None:
            ledger.budget = float(budget)
        if ledger.releases:
            if delta is not None and not math.isclose(delta, ledger.delta or 0.0, rel_tol=1e-9):
                raise MedmergeError(
                    f"{ledger.path}: the site's δ is {ledger.delta:g}, not {delta:g} (ε composes at one δ; "
                    "set privacy.delta to it)"
                )
        else:
            ledger.delta = delta if delta is not None else ledger.delta
            ledger.accountant = accountant or ledger.accountant
        return ledger

    @classmethod
    def _read(cls, folder: Path) -> PrivacyLedger:
        path = folder / LEDGER_FILE
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(
                folder=folder,
                delta=data["delta"],
                accountant=data["accountant"],
                budget=data.get("budget"),
                unit=data.get("unit"),
                unit_words=data.get("unit_words", ""),
                releases=[Release.from_json(r) for r in data["releases"]],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MedmergeError(f"{path}: not a privacy ledger of format {FORMAT} ({exc})") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "delta": self.delta,
            "accountant": self.accountant,
            "unit": self.unit,
            "unit_words": self.unit_words,
            "budget": self.budget,
            "epsilon": self.epsilon() if self.releases else 0.0,
            "releases": [r.to_json() for r in self.releases],
        }

    # ---------------------------------------------------------------------------------- accounting

    @property
    def history(self) -> list[Entry]:
        """Every release's accountant history, concatenated: what the accountant composes."""
        return [h for r in self.releases for h in r.history]

    def epsilon(self, delta: float | None = None, extra: Release | None = None) -> float:
        """ε_site at `delta` (default the site's δ) over every release (and `extra`, planned)."""
        delta = self._delta(delta)
        history = self.history + (list(extra.history) if extra is not None else [])
        return spent_epsilon(history, delta, self.accountant)

    def _delta(self, delta: float | None) -> float:
        if delta is not None:
            return delta
        if self.delta is None:
            raise MedmergeError(f"{self.path}: the site's δ is not set (load the ledger with delta=…)")
        return self.delta

    def check(self, release: Release) -> float:
        """ε_site after `release` (planned: its history as the caller will spend it); MedmergeError if
        its unit differs from the ledger's or it would take ε_site past the budget."""
        if self.unit is not None and release.unit != self.unit:
            raise MedmergeError(
                f"{self.path}: the site's releases protect one {self.unit}; {release.what} protects one "
                f"{release.unit} (a ledger composes one unit)"
            )
        after = self.epsilon(extra=release)
        if self.budget is not None and after > self.budget:
            spent = self.epsilon() if self.releases else 0.0
            raise OverBudgetError(
                f"privacy.budget: {release.what} would take the site's ε from {spent:.3g} to {after:.3g} "
                f"(δ = {self.delta:.2g}), over its budget {self.budget:g}; refused"
            )
        return after

    def charge(self, release: Release) -> Release:
        """Record a release: re-read the file under a lock, check it (unit, budget), append it with its
        own ε and the time, write the ledger atomically. Returns the recorded release."""
        with self._locked():
            if self.path.is_file():
                current = self._read(self.folder)
                self.releases, self.unit, self.unit_words = current.releases, current.unit, current.unit_words
                if current.releases:
                    self.delta, self.accountant = current.delta, current.accountant
            self.check(release)
            delta = self._delta(None)
            recorded = replace(
                release,
                when=round(time.time(), 3),
                delta=delta,
                accountant=self.accountant,
                epsilon=spent_epsilon(release.history, delta, self.accountant),
            )
            self.releases.append(recorded)
            if self.unit is None:
                self.unit, self.unit_words = release.unit, release.unit_words
            write_json_atomic(self.path, self.to_json())
        return recorded

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f".{LEDGER_FILE}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def summary(self) -> dict[str, Any] | None:
        """What a site reports of its ledger (the federation's verdict shows it; None: no release yet):
        ε and δ, the budget, the unit, and per release its name, kind, mechanism, ε alone and accountant
        history [(σ, q, steps)] — what a reader needs to recompute the composition, nothing else. q is
        the expected batch over N units, so it reveals N to within the batch size's rounding."""
        if not self.releases:
            return None
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "accountant": self.accountant,
            "unit": self.unit,
            "unit_words": self.unit_words,
            "budget": self.budget,
            "releases": [
                {
                    "what": r.what,
                    "kind": r.kind,
                    "mechanism": r.mechanism,
                    "epsilon": r.epsilon if r.epsilon is not None else 0.0,
                    "history": [list(h) for h in r.history],
                }
                for r in self.releases
            ],
        }

    def lines(self, delta: float | None = None) -> list[str]:
        """The ledger for a report: one line per release, then the composed ε."""
        delta = self._delta(delta)
        out = [
            f"- {r.what}: {r.mechanism}, history {[list(h) for h in r.history]}, ε alone "
            f"{spent_epsilon(r.history, delta, self.accountant):.3g}"
            for r in self.releases
        ]
        budget = f" of budget {self.budget:g}" if self.budget is not None else ""
        words = f" ({self.unit_words})" if self.unit_words else ""
        out.append(
            f"composed: ε = {self.epsilon(delta):.3g}{budget} at δ = {delta:.2g}, per {self.unit}{words}, "
            f"{self.accountant} accountant"
        )
        return out
