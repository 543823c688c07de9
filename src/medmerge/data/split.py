"""Reproducible, group-disjoint train / validation / test splits.

Each pair's group key (MedQuAD: the focus, so paraphrases about one disease stay together; otherwise the
normalised question) is hashed with the seed: u = SHA-256(seed ‖ key) / 2^64 ∈ [0, 1). The group goes to
train if u < f_train, to validation if u < f_train + f_val, else to test. The hash depends only on the
seed and the key, so a split is the same on every run and machine, whatever the order of the records.
Exact-duplicate questions (after normalisation) are removed first, keeping the first one seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from medmerge.data.records import QAPair, normalise_question
from medmerge.errors import MedmergeError

SplitName = Literal["train", "validation", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, validation, test


@dataclass(frozen=True)
class Splits:
    train: list[QAPair]
    validation: list[QAPair]
    test: list[QAPair]
    duplicates_removed: int

    def __getitem__(self, name: str) -> list[QAPair]:
        if name not in SPLITS:
            raise MedmergeError(f"unknown split {name!r} (choices: {', '.join(SPLITS)})")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {name: len(self[name]) for name in SPLITS}


def group_position(key: str, seed: int) -> float:
    """u ∈ [0, 1): the first 8 bytes of SHA-256(f"{seed}\\0{key}") as an unsigned integer / 2^64."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def deduplicate(pairs: list[QAPair]) -> list[QAPair]:
    """Drop pairs whose normalised question was already seen (the first one wins)."""
    seen: set[str] = set()
    kept = []
    for pair in pairs:
        key = normalise_question(pair.question)
        if key not in seen:
            seen.add(key)
            kept.append(pair)
    return kept


def split_pairs(
    pairs: list[QAPair], fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> Splits:
    """Split `pairs` by a seeded hash of their group key into train / validation / test (see module doc)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise MedmergeError(f"split fractions {fractions}: expected three non-negative numbers summing to 1")
    unique = deduplicate(pairs)
    out: dict[str, list[QAPair]] = {name: [] for name in SPLITS}
    train_end, validation_end = fractions[0], fractions[0] + fractions[1]
    for pair in unique:
        u = group_position(pair.group_key(), seed)
        name = "train" if u < train_end else "validation" if u < validation_end else "test"
        out[name].append(pair)
    return Splits(**out, duplicates_removed=len(pairs) - len(unique))


def split_fingerprint(pairs: list[QAPair]) -> str:
    """SHA-256 over the sorted ids of a split: two runs used the same questions iff these agree."""
    digest = hashlib.sha256()
    for pair_id in sorted(p.id for p in pairs):
        digest.update(pair_id.encode() + b"\n")
    return digest.hexdigest()
