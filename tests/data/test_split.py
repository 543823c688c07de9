"""Splits: group-disjoint, deduplicated, stable across runs, orders and machines."""

from __future__ import annotations

import hashlib
import random

import pytest

from medmerge.data import QAPair, load_dataset, split_fingerprint, split_pairs
from medmerge.data.split import group_position
from medmerge.errors import MedmergeError


def test_group_position_is_the_documented_hash():
    digest = hashlib.sha256(b"7\0focus:gout").digest()
    assert group_position("focus:gout", 7) == int.from_bytes(digest[:8], "big") / 2**64


def make_pairs() -> list[QAPair]:
    pairs = []
    for disease in range(60):
        for k in range(3):  # three paraphrases per focus
            pairs.append(
                QAPair(
                    id=f"d{disease}-{k}",
                    question=f"Q{k} about disease {disease}?",
                    answer="A.",
                    source="t",
                    focus=f"Disease {disease}",
                )
            )
    return pairs


def test_split_is_group_disjoint_and_order_independent():
    pairs = make_pairs()
    splits = split_pairs(pairs, seed=3)
    focus = {name: {p.focus for p in splits[name]} for name in ("train", "validation", "test")}
    assert not (focus["train"] & focus["test"]) and not (focus["train"] & focus["validation"])
    assert not (focus["validation"] & focus["test"])
    assert sum(splits.sizes().values()) == len(pairs)
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    again = split_pairs(shuffled, seed=3)
    for name in ("train", "validation", "test"):
        assert split_fingerprint(again[name]) == split_fingerprint(splits[name])
    other_seed = split_pairs(pairs, seed=4)
    assert split_fingerprint(other_seed.test) != split_fingerprint(splits.test)


def test_exact_duplicate_questions_are_removed_first_kept():
    a = QAPair(id="1", question="What is  Gout?", answer="first", source="t")
    b = QAPair(id="2", question="what is gout?", answer="second", source="t")
    splits = split_pairs([a, b], seed=0)
    assert splits.duplicates_removed == 1
    assert [p.answer for name in ("train", "validation", "test") for p in splits[name]] == ["first"]


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (1.0, 0.0)])
def test_bad_fractions(fractions):
    with pytest.raises(MedmergeError, match="fractions"):
        split_pairs(make_pairs(), fractions=fractions)


def test_unknown_split_name_lists_choices():
    with pytest.raises(MedmergeError, match="choices: train, validation, test"):
        split_pairs(make_pairs())["dev"]


def test_real_medquad_split_is_disjoint_by_focus_and_stable(shared_datasets):
    ds = load_dataset(f"medquad:{shared_datasets / 'MedQuAD-master.zip'}")
    splits = split_pairs(ds.pairs, seed=0)
    keys = {name: {p.group_key() for p in splits[name]} for name in ("train", "validation", "test")}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    sizes = splits.sizes()
    total = sum(sizes.values())
    assert total + splits.duplicates_removed == len(ds)
    assert 0.75 < sizes["train"] / total < 0.85 and 0.05 < sizes["test"] / total < 0.15
    assert split_fingerprint(split_pairs(ds.pairs, seed=0).test) == split_fingerprint(splits.test)
