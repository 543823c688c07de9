"""The verdict's PubMedQA accuracy column: present where some set has it, pooled over those sets only."""

from __future__ import annotations

from dataclasses import replace

from medmerge.config import ExperimentConfig
from medmerge.evaluate.records import Evaluation
from medmerge.pipeline.verdict import table_markdown, verdict
from tests.pipeline.test_verdict import N, _evaluation, _validation

CONFIG = ExperimentConfig(
    experts=[{"name": "a", "data": ["jsonl:a.jsonl"]}, {"name": "b", "data": ["jsonl:b.jsonl"]}],
    methods=["linear"],
)
VALIDATION = _validation({"a": 2.0, "b": 2.1, "multitask": 1.8, "linear-full": 1.9})
LOSSES = {"a": 2.0, "b": 2.4, "multitask": 1.8, "linear": 1.9}


def _with_accuracy(evaluation: Evaluation, hits: dict[str, int]) -> Evaluation:
    """The OOD cells gain a per-question accuracy: `hits[model]` of the N questions right."""
    cells = dict(evaluation.cells)
    for model, k in hits.items():
        cell = cells[(model, "ood")]
        per_item = cell.per_item | {"accuracy": [1.0] * k + [0.0] * (N - k)}
        cells[(model, "ood")] = replace(cell, per_item=per_item)
    return replace(evaluation, cells=cells)


def test_no_accuracy_keeps_the_table_unchanged() -> None:
    v = verdict(CONFIG, VALIDATION, _evaluation(LOSSES, LOSSES))
    assert "accuracy" not in table_markdown(v)
    assert all(not key.endswith(":accuracy") for row in v.to_json()["table"] for key in row)
    assert set(v.comparisons["out-of-domain"]) == {"loss", "rougeL", "bertscore_f1"}


def test_accuracy_column_where_a_set_has_it() -> None:
    hits = {"a": 4, "b": 2, "multitask": 6, "linear": 5}
    v = verdict(CONFIG, VALIDATION, _with_accuracy(_evaluation(LOSSES, LOSSES), hits))
    rows = {row.model: row for row in v.table}
    assert rows["linear"].value("out-of-domain", "accuracy") == 5 / N
    assert rows["linear"].value("in-domain", "accuracy") is None
    assert v.comparisons["out-of-domain"]["accuracy"].diff == (5 - 4) / N  # merge − best expert
    head = table_markdown(v).splitlines()[0]
    assert "out-of-domain PubMedQA accuracy ↑" in head and "in-domain PubMedQA accuracy" not in head
    assert "| 0.625 |" in table_markdown(v)
