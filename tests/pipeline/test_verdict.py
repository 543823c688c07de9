"""The verdict's numbers on hand-made results: choice on validation, paired tests, hindsight, gap."""

from __future__ import annotations

import pytest

from medmerge.config import ExperimentConfig
from medmerge.pipeline.verdict import summary_lines, verdict

N = 8


def _cell(losses: list[float]) -> dict:
    return {"per_item": {"loss": losses}, "weights": {"loss": [10.0] * len(losses)}}


def test_verdict_compares_on_validation_choice_and_in_hindsight() -> None:
    config = ExperimentConfig(
        experts=[{"name": "a", "data": ["jsonl:a.jsonl"]}, {"name": "b", "data": ["jsonl:b.jsonl"]}],
        methods=["linear"],
    )
    validation = {
        "a": {"loss": 2.0},
        "b": {"loss": 2.1},
        "multitask": {"loss": 1.8},
        "linear-full": {"loss": 1.9},
    }
    ind = {"a": 2.0, "b": 2.4, "multitask": 1.8, "linear": 1.9}  # per-question in-domain test loss
    ood = {"a": 3.5, "b": 3.0, "multitask": 3.3, "linear": 3.1}  # b is best out of domain, in hindsight
    results = {
        "datasets": [{"name": "ind", "domain": "in-domain"}, {"name": "ood", "domain": "out-of-domain"}],
        "models": [{"name": m} for m in ind],
        "results": {m: {"ind": _cell([ind[m]] * N), "ood": _cell([ood[m]] * N)} for m in ind},
    }
    v = verdict(config, validation, results)
    assert v["chosen_merge"] == "linear" and v["best_expert"] == "a"
    assert v["comparisons"]["out-of-domain"]["loss"]["diff"] == pytest.approx(3.1 - 3.5)
    assert v["comparisons"]["in-domain"]["loss"]["diff"] == pytest.approx(1.9 - 2.0)
    assert set(v["hindsight"]) == {"out-of-domain"}  # in domain, a is best both ways
    assert v["hindsight"]["out-of-domain"]["expert"] == "b"
    assert v["hindsight"]["out-of-domain"]["loss"]["diff"] == pytest.approx(3.1 - 3.0)
    assert v["gap"] == pytest.approx(0.2) and v["gap_closed"] == pytest.approx(0.5)
    text = "\n".join(summary_lines(v))
    assert "out-of-domain: the merge's test loss is lower than the best expert's (Δ = -0.4000" in text
    assert "in hindsight, b, the merge's test loss is not lower (Δ = +0.1000" in text
    assert "closed by the merge: 50.0%" in text
