"""Dataset SPECs: `KIND:PATH[?option=value&...]` (`medquad:data/MedQuAD-master.zip`) or a bare KIND.

KIND names a `DatasetKind` of medmerge.data.kinds (medquad, icliniq, genmedgpt, pubmedqa, jsonl, csv),
which also lists its options. For jsonl/csv the options name the columns:
`jsonl:mine.jsonl?question=prompt&answer=response&id=uid&group=patient` (a `group` column is read
without the option where the file has one). A bare KIND (`medquad`, also
`medquad:` or `KIND?options`) is a public dataset found by `medmerge.data.resolve`: `$MEDMERGE_DATA`,
the folder `scripts/setup.sh` registered, the cache, else a verified download.

MedQuAD takes `?collections=A,B`: only the named source collections (folder names such as
`1_CancerGov_QA`), so one download can stand for several institutions in a federated study.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from medmerge.data.kinds import DATASET_KINDS
from medmerge.errors import MedmergeError

KINDS = tuple(DATASET_KINDS)


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: Path | None  # None: a public dataset found by `medmerge.data.resolve`
    options: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        head = f"{self.kind}:{self.path}" if self.path is not None else self.kind
        return head + (f"?{query}" if query else "")


def parse_spec(spec: str) -> DataSpec:
    """Parse a SPEC string; unknown kinds or options are a one-line error listing the choices."""
    kind, colon, rest = spec.partition(":")
    if not colon:  # a bare KIND, perhaps with options: `medquad`, `pubmedqa?...`
        kind, _, query = spec.partition("?")
        rest = f"?{query}" if query else ""
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise MedmergeError(f"dataset SPEC {spec!r}: unknown kind {kind!r} (choices: {', '.join(KINDS)})")
    path_text, _, query = rest.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    allowed = DATASET_KINDS[kind].options
    unknown = sorted(set(options) - allowed)
    if unknown:
        choices = ", ".join(sorted(allowed)) or "none"
        raise MedmergeError(
            f"dataset SPEC {spec!r}: unknown option(s) {unknown} for {kind} (choices: {choices})"
        )
    if DATASET_KINDS[kind].needs_path and not path_text:
        raise MedmergeError(f"dataset SPEC {spec!r}: {kind} needs a file path, e.g. {kind}:my_data.{kind}")
    return DataSpec(kind=kind, path=Path(path_text).expanduser() if path_text else None, options=options)
