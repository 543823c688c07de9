"""Lexical metrics against values computed by hand on tiny strings."""

from __future__ import annotations

import pytest

from medmerge.errors import MedmergeError
from medmerge.evaluate.metrics import (
    answer_lengths,
    bleu_scores,
    chrf_scores,
    corpus_bleu_chrf,
    repetition_rates,
    rouge_scores,
    text_metrics,
)


def test_rouge_of_known_pairs() -> None:
    preds = ["the cat sat on the mat", "blood sugar is high"]
    refs = ["the cat lay on the mat", "high blood sugar"]
    scores = rouge_scores(preds, refs)
    # pair 1: LCS = "the cat on the mat" = 5 of 6 tokens each side: P = R = F = 5/6
    assert scores["rougeL"][0] == pytest.approx(5 / 6)
    # pair 2: LCS = "blood sugar" = 2; P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert scores["rougeL"][1] == pytest.approx(4 / 7)
    # ROUGE-1: {blood, sugar, high} overlap 3; P = 3/4, R = 3/3, F = 6/7
    assert scores["rouge1"][1] == pytest.approx(6 / 7)
    # ROUGE-2: pred bigrams {blood sugar, sugar is, is high}, ref {high blood, blood sugar}: P = 1/3, R = 1/2
    assert scores["rouge2"][1] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_rouge_identical_and_disjoint() -> None:
    scores = rouge_scores(["asthma causes wheezing", "fever"], ["asthma causes wheezing", "migraine"])
    assert [scores[k][0] for k in ("rouge1", "rouge2", "rougeL")] == [1.0, 1.0, 1.0]
    assert [scores[k][1] for k in ("rouge1", "rouge2", "rougeL")] == [0.0, 0.0, 0.0]


def test_bleu_and_chrf_order_identical_partial_disjoint() -> None:
    ref = "patients with type 2 diabetes should check their blood glucose every day"
    preds = [ref, "patients with diabetes should check blood glucose daily", "take two aspirin tomorrow"]
    bleu = bleu_scores(preds, [ref] * 3)
    chrf = chrf_scores(preds, [ref] * 3)
    assert bleu[0] == pytest.approx(100.0) and chrf[0] == pytest.approx(100.0)
    assert bleu[0] > bleu[1] > bleu[2] >= 0.0
    assert chrf[0] > chrf[1] > chrf[2] >= 0.0
    corpus = corpus_bleu_chrf([ref], [ref])
    assert corpus == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}


def test_lengths_and_repetition_by_hand() -> None:
    assert answer_lengths(["one two  three", "", "x"]) == [3.0, 0.0, 1.0]
    # "a b c d a b c d": 4-grams abcd, bcda, cdab, dabc, abcd → 5 grams, 4 distinct → 1 − 4/5
    rates = repetition_rates(["a b c d a b c d", "a b c", "w x y z v", "go go go go go go"])
    assert rates[0] == pytest.approx(0.2)
    assert rates[1] == 0.0  # shorter than n
    assert rates[2] == 0.0  # no repeats
    assert rates[3] == pytest.approx(1 - 1 / 3)  # 3 grams, all "go go go go"


def test_text_metrics_keys_and_length_mismatch() -> None:
    out = text_metrics(["a b"], ["a b"])
    assert set(out) == {"rouge1", "rouge2", "rougeL", "bleu", "chrf", "length", "repetition"}
    assert all(len(v) == 1 for v in out.values())
    with pytest.raises(MedmergeError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])
