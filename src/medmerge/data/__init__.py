"""Medical Q&A data: one record type, a loader per publisher format, seeded group-disjoint splits, prompts.

>>> from medmerge.data import load_dataset, split_pairs
>>> ds = load_dataset("medquad")  # $MEDMERGE_DATA, setup.sh's mirror, the cache or a download
>>> splits = split_pairs(ds.pairs, seed=0)     # train / validation / test, disjoint by focus
"""

from medmerge.data.kinds import DATASET_KINDS, DatasetKind
from medmerge.data.prompts import IGNORE_INDEX, build_prompt, encode_pair, pad_batch
from medmerge.data.records import Dataset, QAPair, normalise_question, normalise_whitespace
from medmerge.data.resolve import load_dataset, resolve_dataset, spec_checksum, spec_path
from medmerge.data.specs import KINDS, DataSpec, parse_spec
from medmerge.data.split import DEFAULT_FRACTIONS, SPLITS, Splits, split_fingerprint, split_pairs

__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "DATASET_KINDS",
    "DEFAULT_FRACTIONS",
    "SPLITS",
    "DataSpec",
    "Dataset",
    "DatasetKind",
    "QAPair",
    "Splits",
    "build_prompt",
    "encode_pair",
    "load_dataset",
    "load_split",
    "normalise_question",
    "normalise_whitespace",
    "pad_batch",
    "parse_spec",
    "resolve_dataset",
    "spec_checksum",
    "spec_path",
    "split_fingerprint",
    "split_pairs",
]


def load_split(
    spec: str,
    split: str,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    limit: int | None = None,
) -> list[QAPair]:
    """The pairs of one split of a SPEC; `limit` keeps the first n (in file order) for quick runs."""
    pairs = split_pairs(load_dataset(spec).pairs, fractions, seed)[split]
    return pairs[:limit] if limit is not None else pairs
