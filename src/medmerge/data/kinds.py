"""The one table of dataset kinds: a SPEC's KIND (medmerge.data.specs) names one `DatasetKind` here.

A kind is its loader (medmerge.data.loaders: `loader(path, **options) -> Dataset`), its options (the
loader's keyword-only parameters, read from its signature: `?name=value` in a SPEC), and, for a public
dataset, its pinned `Source` (what `medmerge data fetch NAME` downloads and verifies and what a bare
KIND resolves to: medmerge.data.fetch, .resolve). Adding a kind = a loader + one entry here + its line
in docs/architecture.md's table + its fixture in tests/data/fixtures (tests/data/test_kinds.py checks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from medmerge.data import loaders
from medmerge.data.records import Dataset

MEDQUAD_COMMIT = "577bd37b96c02d1833b2c9eed2de9f96964e96cb"
PUBMEDQA_COMMIT = "1cbae8e92f72f20c8d3747cbb3bf5bc53554d997"


@dataclass(frozen=True)
class Source:
    url: str
    filename: str  # the publisher's file name: in the cache and in local mirror folders
    sha256: str  # of the file's bytes; of `archive_digest` where `archive` is true
    licence: str
    archive: bool = False
    aliases: tuple[str, ...] = ()  # other names a local mirror may hold it under

    @property
    def names(self) -> tuple[str, ...]:
        """Every file name the dataset may have in a mirror folder, the publisher's first."""
        return (self.filename, *self.aliases)


@dataclass(frozen=True)
class DatasetKind:
    name: str
    loader: Callable[..., Dataset]  # (path, **options) → Dataset
    source: Source | None = None  # the pinned public copy; None: users give a path
    needs_path: bool = False  # a SPEC of this kind must name a file (users' own data)

    @property
    def options(self) -> frozenset[str]:
        """The SPEC options of this kind: the loader's keyword-only parameters."""
        parameters = inspect.signature(self.loader).parameters.values()
        return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


MEDQUAD = Source(
    url=f"https://github.com/abachaa/MedQuAD/archive/{MEDQUAD_COMMIT}.zip",
    filename="MedQuAD-master.zip",
    sha256="6dcaa277ff9136a48a2845513c1b7f1af550b5ccd66cb5148a2bb0ca8e620ca5",
    licence="CC BY 4.0 (Ben Abacha & Demner-Fushman, BMC Bioinformatics 2019)",
    archive=True,
    aliases=(f"MedQuAD-{MEDQUAD_COMMIT}.zip",),
)
GENMEDGPT = Source(  # ChatDoctor commit e77bd7ebafbf; the full hash was not at hand offline: the branch
    url="https://raw.githubusercontent.com/Kent0n-Li/ChatDoctor/main/chatdoctor5k.json",
    filename="chatdoctor5k.json",
    sha256="780c1a6aa67d461359ac220c120134429290b1e340545c3ad8954e1aa235d80f",
    licence="Apache-2.0",
)
PUBMEDQA = Source(
    url=f"https://raw.githubusercontent.com/pubmedqa/pubmedqa/{PUBMEDQA_COMMIT}/data/ori_pqal.json",
    filename="pubmedqa_ori_pqal.json",
    sha256="8b3276be8942ebbd77f3ddcda12c1749bf0e490045a736fd8438ee40cf37a41d",
    licence="MIT",
)

DATASET_KINDS: dict[str, DatasetKind] = {
    k.name: k
    for k in [
        DatasetKind("medquad", loaders.load_medquad, source=MEDQUAD),
        DatasetKind("icliniq", loaders.load_icliniq),
        DatasetKind("genmedgpt", loaders.load_genmedgpt, source=GENMEDGPT),
        DatasetKind("pubmedqa", loaders.load_pubmedqa, source=PUBMEDQA),
        DatasetKind("jsonl", loaders.load_jsonl, needs_path=True),
        DatasetKind("csv", loaders.load_csv, needs_path=True),
    ]
}
