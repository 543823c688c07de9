"""The (ε, δ) differential-privacy guarantee of a model folder, for reports and verdicts.

An expert trained with DP-SGD carries its guarantee in `manifest.json` (medmerge.train.privacy). A merge
is a function of its inputs only, so by post-processing a merge of DP experts is (max ε_i, max δ_i)-DP
with respect to each site's training pairs. A merge with any input trained without DP has no guarantee.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medmerge.errors import MedmergeError
from medmerge.train.privacy import read_privacy

POST_PROCESSING = (
    "A merge of DP experts is DP at the largest ε (and δ) of its inputs, by post-processing: "
    "merging reads nothing but the experts' weights."
)


@dataclass(frozen=True)
class DPGuarantee:
    epsilon: float  # ε spent (expert) or max ε over the merged experts
    delta: float
    accountant: str
    experts: int = 1  # how many DP experts the guarantee covers (1: the expert itself)

    @property
    def label(self) -> str:
        """`ε = 1.00, δ = 1e-04` (with `, merge of n` for a merge)."""
        merged = f", merge of {self.experts}" if self.experts > 1 else ""
        return f"ε = {self.epsilon:.2f}, δ = {self.delta:.0e}{merged}"


def dp_guarantee(path: str | Path) -> DPGuarantee | None:
    """The DP guarantee of an expert or merge folder; None without one (base models, non-DP inputs)."""
    folder = Path(path)
    if (folder / "manifest.json").is_file():
        record = read_privacy(folder)
        return None if record is None else DPGuarantee(record.epsilon, record.delta, record.accountant)
    merge_file = folder / "merge.json"
    if not merge_file.is_file():
        return None
    try:
        inputs = [m["path"] for m in json.loads(merge_file.read_text())["inputs"]["models"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise MedmergeError(f"{merge_file}: cannot read the merge's inputs") from None
    guarantees = [dp_guarantee(p) for p in inputs]
    if not guarantees or any(g is None for g in guarantees):
        return None
    accountants = sorted({g.accountant for g in guarantees})
    return DPGuarantee(
        epsilon=max(g.epsilon for g in guarantees),
        delta=max(g.delta for g in guarantees),
        accountant="+".join(accountants),
        experts=sum(g.experts for g in guarantees),
    )
