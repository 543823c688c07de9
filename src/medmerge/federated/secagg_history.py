"""What a site remembers of the secure sums it joined (`secagg_history.json` in its folder), and its policy.

The rule against differencing: write each unnoised sum the site joined as a row of coefficients over
sites (w_u for each participant, 0 elsewhere). The coordinator holds Σ_u w_u x_u for every row, so if a
site's indicator e_X lies in the span of the rows, x_X follows by linear combination (assuming the sites'
vectors did not change in between, which the rule does not try to know: it refuses as if they had not).
A new unnoised sum is refused when it would put some e_X in that span. Two sets that differ by one site
X give e_X = 1_S − 1_S′ and are the common case (leave-one-site-out, a retry without a dropped site); the
same set under other weights, or a longer chain of sums, are caught as well. Only the sums this site
joined are known to it: combinations of sums it did not join are outside any single site's view.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medmerge.errors import MedmergeError
from medmerge.federated.secagg_records import MIN_PARTICIPANTS, SiteName
from medmerge.manifest import write_json_atomic

HISTORY_FILE = "secagg_history.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SitePolicy(_Strict):
    """A site's own limits on secure sums (its config; not the coordinator's to change)."""

    max_sums: int = Field(default=64, ge=1, description="secure sums this site joins in all, ever")
    min_participants: int = Field(default=MIN_PARTICIPANTS, ge=MIN_PARTICIPANTS)
    allow_unnoised: bool = Field(default=True, description="False: join secure+dp sums only")


class UnnoisedSum(_Strict):
    round_id: SiteName
    coefficients: dict[SiteName, Annotated[float, Field(gt=0, allow_inf_nan=False)]]


class _HistoryFile(_Strict):
    version: Literal[1] = 1
    sums_joined: int = Field(default=0, ge=0)
    unnoised: tuple[UnnoisedSum, ...] = ()


class SumHistory:
    """The site's count of sums joined and its unnoised sums' coefficient rows, read from and written to
    `folder/secagg_history.json` (atomic rename) at every change, before the site's message leaves."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / HISTORY_FILE
        self._data = _HistoryFile()
        if self.path.exists():
            try:
                self._data = _HistoryFile.model_validate_json(self.path.read_bytes())
            except ValidationError as exc:
                raise MedmergeError(
                    f"{self.path}: not a secure-sum history ({exc.error_count()} invalid fields)"
                ) from None

    @property
    def sums_joined(self) -> int:
        return self._data.sums_joined

    @property
    def unnoised(self) -> tuple[UnnoisedSum, ...]:
        return self._data.unnoised

    def _save(self, data: _HistoryFile) -> None:
        write_json_atomic(self.path, data.model_dump(mode="json"))
        self._data = data

    def add_joined(self) -> None:
        self._save(self._data.model_copy(update={"sums_joined": self._data.sums_joined + 1}))

    def add_unnoised(self, round_id: str, coefficients: Mapping[str, float]) -> None:
        row = UnnoisedSum(round_id=round_id, coefficients=dict(coefficients))
        self._save(self._data.model_copy(update={"unnoised": (*self._data.unnoised, row)}))

    def reveals(self, coefficients: Mapping[str, float]) -> str | None:
        """Why an unnoised sum with these coefficients may not be joined (a phrase), or None."""
        rows = [dict(r.coefficients) for r in self._data.unnoised] + [dict(coefficients)]
        sites = sorted(set().union(*rows))
        matrix = np.array([[row.get(x, 0.0) for x in sites] for row in rows])
        _, singular, vt = np.linalg.svd(matrix, full_matrices=False)
        basis = vt[singular > singular[0] * 1e-12]  # tight: near-dependent rows count as independent
        for j, site in enumerate(sites):
            if np.linalg.norm(basis[:, j]) ** 2 < 1 - 1e-9:  # ‖projection of e_X‖² = Σ_k basis[k, j]²
                continue
            for prior in self._data.unnoised:
                if set(prior.coefficients) ^ set(coefficients) == {site} and all(
                    prior.coefficients[x] == coefficients[x]
                    for x in set(prior.coefficients) & set(coefficients)
                ):
                    return f"differs by one site ({site}) from the unnoised sum {prior.round_id}"
            return f"would reveal site {site}'s values with the unnoised sums this site joined"
        return None
