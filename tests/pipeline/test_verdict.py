"""The verdict's numbers on hand-made results: choice on validation, paired tests, hindsight, gap."""

from __future__ import annotations

from dataclasses import replace

import pytest

from medmerge.config import ExperimentConfig
from medmerge.evaluate.records import CacheStats, EvalCell, Evaluation, ModelRef, ScoredSet, Timing
from medmerge.pipeline.records import ValidationRecord
from medmerge.pipeline.verdict import summary_lines, table_markdown, verdict

N = 8


def _cell(losses: list[float]) -> EvalCell:
    return EvalCell(
        metrics={},
        corpus={},
        timing=Timing(0.0, 0.0),
        cached={},
        reference_length=0.0,
        per_item={"loss": losses},
        weights={"loss": [10.0] * len(losses)},
        ids=[str(i) for i in range(len(losses))],
        answers=None,
    )


def _evaluation(ind: dict[str, float], ood: dict[str, float]) -> Evaluation:
    """Every model scores the same loss on each of the N questions of `ind` (in-domain) and `ood`."""
    sets = [("ind", "in-domain", ind), ("ood", "out-of-domain", ood)]
    return Evaluation(
        models=tuple(ModelRef(m, m, m, "causal") for m in ind),
        datasets=tuple(ScoredSet(s, f"jsonl:{s}.jsonl", None, d, N, "", None) for s, d, _ in sets),
        cells={(m, s): _cell([loss[m]] * N) for s, _, loss in sets for m in ind},
        comparisons=(),
        examples={},
        settings={},
        manifest={},
        cache=CacheStats(None, 0, 0),
    )


def _validation(losses: dict[str, float]) -> dict[str, ValidationRecord]:
    return {name: ValidationRecord(name, name, loss, {}) for name, loss in losses.items()}


def test_verdict_compares_on_validation_choice_and_in_hindsight() -> None:
    config = ExperimentConfig(
        experts=[{"name": "a", "data": ["jsonl:a.jsonl"]}, {"name": "b", "data": ["jsonl:b.jsonl"]}],
        methods=["linear"],
    )
    validation = _validation({"a": 2.0, "b": 2.1, "multitask": 1.8, "linear-full": 1.9})
    ind = {"a": 2.0, "b": 2.4, "multitask": 1.8, "linear": 1.9}  # per-question in-domain test loss
    ood = {"a": 3.5, "b": 3.0, "multitask": 3.3, "linear": 3.1}  # b is best out of domain, in hindsight
    v = verdict(config, validation, _evaluation(ind, ood))
    assert v.chosen_merge == "linear" and v.best_expert == "a"
    assert v.comparisons["out-of-domain"]["loss"].diff == pytest.approx(3.1 - 3.5)
    assert v.comparisons["in-domain"]["loss"].diff == pytest.approx(1.9 - 2.0)
    assert set(v.hindsight) == {"out-of-domain"}  # in domain, a is best both ways
    assert v.hindsight["out-of-domain"].expert == "b"
    assert v.hindsight["out-of-domain"].loss.diff == pytest.approx(3.1 - 3.0)
    assert v.gap == pytest.approx(0.2) and v.gap_closed == pytest.approx(0.5)
    text = "\n".join(summary_lines(v))
    assert "out-of-domain: the merge's test loss is lower than the best expert's (Δ = -0.4000" in text
    assert "in hindsight, b, the merge's test loss is not lower (Δ = +0.1000" in text
    assert "closed by the merge: 50.0%" in text

    (linear,) = v.by_method  # every method's gap closed, per domain: (L_a − L_m) / (L_a − L_multitask)
    assert linear.gap_closed == {"in-domain": pytest.approx(0.5), "out-of-domain": pytest.approx(2.0)}
    assert v.families == ()  # only data-free methods: no family to compare with them

    data = v.to_json()  # verdict.json keeps its shape, and gains the by-method keys at its end
    assert list(data) == [
        "chosen_merge",
        "best_expert",
        "table",
        "comparisons",
        "hindsight",
        "gap",
        "gap_closed",
        "by_method",
        "families",
    ]
    assert data["table"][0] == {
        "model": "a",
        "validation_loss": 2.0,
        "in-domain:loss": pytest.approx(2.0),
        "in-domain:rougeL": None,
        "in-domain:bertscore_f1": None,
        "out-of-domain:loss": pytest.approx(3.5),
        "out-of-domain:rougeL": None,
        "out-of-domain:bertscore_f1": None,
    }
    assert data["comparisons"]["in-domain"]["rougeL"] is None
    assert set(data["comparisons"]["in-domain"]["loss"]) == {
        "diff",
        "low",
        "high",
        "p_value",
        "n",
        "confidence",
    }
    assert data["hindsight"]["out-of-domain"]["expert"] == "b"


def test_an_expert_named_like_a_merge_is_not_its_candidate() -> None:
    """`ties-x` is an expert, not a TIES merge: names match exactly, never by prefix."""
    config = ExperimentConfig(
        experts=[{"name": "a", "data": ["jsonl:a.jsonl"]}, {"name": "ties-x", "data": ["jsonl:t.jsonl"]}],
        methods=["linear", "ties"],
        spaces=["full", "lora"],
    )
    validation = _validation(
        {
            "base": 2.5,
            "a": 2.0,
            "ties-x": 1.5,  # lower than any merge: a prefix match would choose TIES on it
            "multitask": 1.8,
            "linear-full": 1.9,
            "linear-lora": 1.92,
            "ties-full": 1.97,
            "ties-lora": 1.95,
        }
    )
    losses = {"base": 2.5, "a": 2.0, "ties-x": 2.2, "multitask": 1.8, "linear": 1.9, "ties": 1.95}
    v = verdict(config, validation, _evaluation(losses, losses))
    assert v.chosen_merge == "linear" and v.best_expert == "ties-x"
    rows = {row.model: row.validation_loss for row in v.table}
    assert rows["ties"] == pytest.approx(1.95)  # min(ties-full, ties-lora), without ties-x
    assert rows["linear"] == pytest.approx(1.9) and rows["ties-x"] == pytest.approx(1.5)
    assert rows["base"] == pytest.approx(2.5)
    assert "| ties | 1.950 |" in table_markdown(v)


def test_no_multitask_model_means_no_gap() -> None:
    config = ExperimentConfig(
        experts=[{"name": "a", "data": ["jsonl:a.jsonl"]}, {"name": "b", "data": ["jsonl:b.jsonl"]}],
        methods=["linear"],
        multitask=False,
    )
    validation = _validation({"a": 2.0, "b": 2.1, "linear-full": 1.9, "linear-lora": 1.8})
    losses = {"a": 2.0, "b": 2.4, "linear": 1.9}
    v = verdict(config, validation, _evaluation(losses, losses))
    assert v.gap is None and v.gap_closed is None and "gap" not in v.to_json()
    assert next(r for r in v.table if r.model == "linear").validation_loss == pytest.approx(1.8)


def _gap_verdict(merge_loss: float, per_question_noise: bool) -> list[str]:
    """Summary lines for a merge at `merge_loss` in domain; noise makes the merge − expert CI straddle 0."""
    config = ExperimentConfig(
        experts=[{"name": "a", "data": ["jsonl:a.jsonl"]}, {"name": "b", "data": ["jsonl:b.jsonl"]}],
        methods=["linear"],
    )
    validation = _validation({"a": 2.0, "b": 2.1, "multitask": 1.8, "linear-full": 1.9})
    losses = {"a": 2.0, "b": 2.4, "multitask": 1.8, "linear": merge_loss}
    evaluation = _evaluation(losses, losses)
    if per_question_noise:  # the merge is better on half the questions and worse on the other half
        wobble = [merge_loss + (0.5 if i % 2 else -0.5) for i in range(N)]
        cells = dict(evaluation.cells) | {("linear", "ind"): _cell(wobble), ("linear", "ood"): _cell(wobble)}
        evaluation = replace(evaluation, cells=cells)
    return summary_lines(verdict(config, validation, evaluation))


def test_verdict_speaks_plainly() -> None:
    beats = "\n".join(_gap_verdict(1.7, per_question_noise=False))
    assert "The merge beats the multi-task model" in beats and "by 0.1000 nats/token" in beats
    assert "closed by the merge" not in beats  # never a share over 100%
    worse = "\n".join(_gap_verdict(2.1, per_question_noise=False))
    assert "worse than the best expert" in worse and "closes none of the gap" in worse
    assert "significantly higher" in worse
    share = "\n".join(_gap_verdict(1.9, per_question_noise=False))
    assert "closed by the merge: 50.0% (0% = no better than the best expert" in share
    noisy = "\n".join(_gap_verdict(1.9, per_question_noise=True))
    assert "no evidence either way" in noisy
