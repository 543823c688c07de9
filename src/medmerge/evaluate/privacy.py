"""The (ε, δ) differential-privacy guarantee of a model folder, computed from what made it, for reports.

An expert trained with DP-SGD carries its guarantee in `manifest.json` (medmerge.train.privacy). A merge
is DP only by what it read, so its guarantee is computed from its method (medmerge.merge.registry) and
its inputs (every DP expert below it, through nested merges):

- a method that reads the experts' training data (`needs_data`: RegMean++) → no guarantee: it runs
  the private pairs through the models again, without noise;
- a method that reads site statistics (`needs_statistics`: RegMean, Fisher) → each site's expert
  history composed with its statistics' release (a `privacy` block in statistics.json: a
  medmerge.train.ledger Release); no guarantee where a site's statistics carry no noise;
- otherwise (data-free: weights only; a soup scored on validation pairs) → post-processing. Experts whose
  data may overlap — one of their sources has the same origin fingerprint (SHA-256 of the ids of every
  pair the SPEC loads, in the manifest; unknown for manifests without it) — compose: their accountant
  histories are concatenated and the accountant gives ε at the largest δ among them. Experts on
  disjoint data: ε = max over those components, δ = max δ.

With any input trained without DP there is no guarantee at all (None). The composed ε answers "what
does this merge reveal about one unit of one site", each site's unit as its experts declared.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.train.dp import PrivacyRecord, read_privacy
from medmerge.train.ledger import Release, spent_epsilon

DP_NOTE = (
    "Differential privacy: an expert's ε is its DP-SGD run's, per its unit of privacy. A merge's ε is "
    "computed from what it read: a data-free merge of experts on disjoint data is DP at the largest ε "
    "(post-processing); experts on overlapping data compose; a merge that reads site statistics composes "
    "their ε (none where they carry no noise); a merge that reads training data (RegMean++) has none."
)


@dataclass(frozen=True)
class DPGuarantee:
    """A model's guarantee: ε = ∞ where its inputs are DP but the merge undoes it (`basis` says why)."""

    epsilon: float  # ε at `delta`; math.inf: no guarantee
    delta: float
    accountant: str
    experts: int = 1  # how many DP experts the guarantee covers (1: the expert itself)
    unit: str = "pair"  # "pair", "group" or "per site" (inputs with different units)
    basis: str = "DP-SGD"  # short: "DP-SGD", "post-processing", "composed", "none: …"
    reason: str = ""  # the full explanation, for reports

    @property
    def label(self) -> str:
        """`ε = 1.00, δ = 1e-04` (with `, merge of n, <basis>` for a merge); `none (<why>)` without one."""
        if not math.isfinite(self.epsilon):
            return self.basis
        merged = f", merge of {self.experts}, {self.basis}" if self.experts > 1 else ""
        return f"ε = {self.epsilon:.2f}, δ = {self.delta:.0e}{merged}"


@dataclass
class _Leaf:
    """A DP expert under a merge, its data's origin fingerprints, and its statistics' release."""

    folder: Path
    record: PrivacyRecord
    origins: frozenset[str] | None  # None: unknown (composed with everything)
    statistics: list[Release] | None = None  # the statistics' releases; None: none or no noise


@dataclass
class _Walk:
    leaves: list[_Leaf] = field(default_factory=list)
    methods: set[str] = field(default_factory=set)
    plain: list[str] = field(default_factory=list)  # inputs without DP


def _origins(folder: Path) -> frozenset[str] | None:
    try:
        data = json.loads((folder / "manifest.json").read_text())["inputs"]["data"]
        found = {s.get("origin_fingerprint") for s in data}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None if None in found or not found else frozenset(found)


def _statistics(folder: Path) -> list[Release] | None:
    """The releases recorded in statistics.json's `privacy` block (one or a list), None without."""
    try:
        block = json.loads((folder / "statistics.json").read_text()).get("privacy")
    except (OSError, ValueError, AttributeError):
        return None
    if not block:
        return None
    try:
        return [Release.from_json(b) for b in (block if isinstance(block, list) else [block])]
    except (MedmergeError, TypeError, ValueError, KeyError):
        return None


def _walk(folder: Path, into: _Walk) -> None:
    """Collect the DP experts below a model folder (through nested merges) and the methods on the way."""
    if (folder / "manifest.json").is_file():
        record = read_privacy(folder)
        if record is None:
            into.plain.append(str(folder))
        else:
            into.leaves.append(_Leaf(folder, record, _origins(folder), _statistics(folder)))
        return
    merge_file = folder / "merge.json"
    if not merge_file.is_file():
        into.plain.append(str(folder))
        return
    try:
        manifest = json.loads(merge_file.read_text())
        inputs = [Path(m["path"]) for m in manifest["inputs"]["models"]]
        into.methods.add(str(manifest["config"]["method"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise MedmergeError(f"{merge_file}: cannot read the merge's inputs") from None
    for path in inputs:
        _walk(path, into)


def _components(leaves: list[_Leaf]) -> list[list[_Leaf]]:
    """Leaves grouped where their data may overlap (a shared or unknown origin fingerprint)."""
    parent = list(range(len(leaves)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(leaves):
        for j in range(i):
            b = leaves[j]
            if a.origins is None or b.origins is None or a.origins & b.origins:
                parent[root(i)] = root(j)
    groups: dict[int, list[_Leaf]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(root(i), []).append(leaf)
    return list(groups.values())


def dp_guarantee(path: str | Path) -> DPGuarantee | None:
    """The DP guarantee of an expert or merge folder (module doc); None without one (base models, any
    input trained without DP)."""
    from medmerge.merge.registry import get_method

    folder = Path(path)
    walk = _Walk()
    _walk(folder, walk)
    if walk.plain or not walk.leaves:
        return None
    records = [leaf.record for leaf in walk.leaves]
    delta = max(r.delta for r in records)
    accountants = sorted({r.accountant for r in records})
    accountant = accountants[0] if len(accountants) == 1 else "prv"
    units = sorted({r.unit for r in records})
    unit = units[0] if len(units) == 1 else "per site"
    if not walk.methods:  # the expert itself
        r = records[0]
        why = f"DP-SGD per {r.unit_words}"
        return DPGuarantee(r.epsilon, r.delta, r.accountant, 1, r.unit, "DP-SGD", why)
    n = len(walk.leaves)
    specs = [get_method(m) for m in sorted(walk.methods)]
    base = {"delta": delta, "accountant": accountant, "experts": n, "unit": unit}
    reading = [s.name for s in specs if s.needs_data]
    if reading:
        why = f"{', '.join(reading)} reads the experts' training data at merge time, without noise"
        return DPGuarantee(math.inf, **base, basis="none: reads training data", reason=why)
    with_stats = [s.name for s in specs if s.needs_statistics]
    if with_stats and any(leaf.statistics is None for leaf in walk.leaves):
        plain = [leaf.folder.name for leaf in walk.leaves if leaf.statistics is None]
        why = f"{', '.join(with_stats)} reads site statistics released without noise ({', '.join(plain)})"
        return DPGuarantee(math.inf, **base, basis="none: statistics without noise", reason=why)
    components = _components(walk.leaves)
    epsilons = []
    for component in components:
        history = [h for leaf in component for h in leaf.record.history]
        if with_stats:
            history += [h for leaf in component for r in leaf.statistics or [] for h in r.history]
        d = max(leaf.record.delta for leaf in component)
        epsilons.append(spent_epsilon(history, d, accountant))
    overlapping = [c for c in components if len(c) > 1]
    if with_stats:
        basis, why = (
            "composed with statistics",
            (
                f"{', '.join(with_stats)} reads noised site statistics: each site's DP-SGD history composed "
                "with its statistics' release"
            ),
        )
    elif overlapping:
        basis = "composed (overlapping data)"
        names = "; ".join(", ".join(leaf.folder.name for leaf in c) for c in overlapping)
        why = f"experts whose data may overlap (shared or unknown origin fingerprint: {names}) compose"
    else:
        basis, why = (
            "post-processing",
            ("data-free merge of experts on disjoint data (origin fingerprints differ): the largest ε"),
        )
    return DPGuarantee(max(epsilons), **base, basis=basis, reason=why)


def refuse_training_split(refs: list[Any], split: str | None) -> None:
    """Evaluation on the `train` split of a DP expert (or a merge of one) publishes exact statistics of
    its private training pairs: refused in one line. `refs`: objects with `name` and `dp` (ModelRef)."""
    if split != "train":
        return
    private = [r.name for r in refs if getattr(r, "dp", None)]
    if private:
        raise MedmergeError(
            f"evaluate.split: train scores the private training pairs of {private[0]} (a DP model) exactly; "
            "use validation or test"
        )
