"""BERTScore: the greedy matching math on hand-made matrices, and the real MiniLM encoder."""

from __future__ import annotations

import math

import pytest
import torch

from medmerge.evaluate.bertscore import bertscore, encoder_dir, greedy_match, idf_weights, load_encoder


def test_greedy_match_by_hand() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.4, 0.8]])  # (Tp=2, Tr=3)
    ones_p, ones_r = torch.ones(2), torch.ones(3)
    p, r, f = greedy_match(sim, ones_p, ones_r)
    assert p == pytest.approx((0.9 + 0.8) / 2)  # each predicted token's best reference match
    assert r == pytest.approx((0.9 + 0.4 + 0.8) / 3)  # each reference token's best predicted match
    assert f == pytest.approx(2 * p * r / (p + r))
    # weights: the first reference token counts 3×, the second not at all
    p, r, _ = greedy_match(sim, torch.tensor([0.0, 1.0]), torch.tensor([3.0, 0.0, 1.0]))
    assert p == pytest.approx(0.8)
    assert r == pytest.approx((3 * 0.9 + 0.8) / 4)
    assert greedy_match(sim, torch.zeros(2), ones_r) == (0.0, 0.0, 0.0)


def test_identical_is_one_and_unrelated_falls() -> None:
    text = "Diabetes is a disease in which blood glucose levels are too high."
    out = bertscore([text, text, ""], [text, "The stock market closed lower on Friday.", text])
    assert out["precision"][0] == pytest.approx(1.0, abs=1e-5)
    assert out["recall"][0] == pytest.approx(1.0, abs=1e-5)
    assert out["f1"][0] == pytest.approx(1.0, abs=1e-5)
    assert out["f1"][1] < 0.5  # unrelated texts
    assert out["f1"][2] == 0.0  # empty prediction


def test_paraphrase_scores_between_unrelated_and_identical() -> None:
    ref = "Wash your hands often and get a flu vaccine every year."
    preds = [
        "Get vaccinated against flu yearly and wash hands frequently.",
        "Quarterly earnings beat estimates.",
    ]
    f1 = bertscore(preds, [ref, ref])["f1"]
    assert 1.0 > f1[0] > f1[1]


def test_idf_weights_by_hand() -> None:
    tokenizer, _ = load_encoder()
    refs = ["fever", "fever cough"]  # M = 2; df(fever) = 2, df(cough) = 1
    w = idf_weights(tokenizer, refs)
    fever, cough = tokenizer.convert_tokens_to_ids(["fever", "cough"])
    assert w[fever] == pytest.approx(math.log(3 / 3))
    assert w[cough] == pytest.approx(math.log(3 / 2))
    assert w[tokenizer.cls_token_id] == 0.0 and w[tokenizer.sep_token_id] == 0.0
    assert w[tokenizer.convert_tokens_to_ids("rash")] == pytest.approx(math.log(3))  # unseen: df = 0


@pytest.mark.parametrize("idf", [False, True])
def test_matches_reference_bert_score_package(idf: bool) -> None:
    bert_score = pytest.importorskip("bert_score")
    preds = ["Diabetes means blood sugar is too high.", "Rest and drink fluids.", "Take antibiotics."]
    refs = [
        "Diabetes is a disease of high blood glucose.",
        "You may have a viral infection; rest.",
        "See a doctor.",
    ]
    ours = bertscore(preds, refs, idf=idf)
    p, r, f = bert_score.score(preds, refs, model_type=str(encoder_dir()), num_layers=6, idf=idf)
    assert ours["precision"] == pytest.approx(p.tolist(), abs=1e-5)
    assert ours["recall"] == pytest.approx(r.tolist(), abs=1e-5)
    assert ours["f1"] == pytest.approx(f.tolist(), abs=1e-5)
