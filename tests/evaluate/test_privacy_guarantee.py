"""The DP guarantee a report shows: an expert's own, a merge's by post-processing, none without DP."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from medmerge.config import ExperimentConfig
from medmerge.errors import MedmergeError
from medmerge.evaluate.privacy import POST_PROCESSING, dp_guarantee
from medmerge.pipeline.verdict import summary_lines, table_markdown, verdict
from medmerge.train.privacy import PrivacyRecord
from tests.pipeline.test_verdict import _evaluation, _validation


def _expert(folder: Path, epsilon: float | None, delta: float = 1e-4) -> Path:
    """An expert folder whose manifest carries a DP record (or `privacy: null`)."""
    folder.mkdir(parents=True)
    record = None
    if epsilon is not None:
        record = PrivacyRecord(epsilon, delta, "prv", 0.5, 0.01, 100, 1.0, 800, 8).to_json()
    (folder / "manifest.json").write_text(json.dumps({"kind": "expert", "privacy": record}))
    return folder


def _merge(folder: Path, inputs: list[Path]) -> Path:
    folder.mkdir(parents=True)
    models = [{"path": str(p), "adapter": True} for p in inputs]
    (folder / "merge.json").write_text(json.dumps({"inputs": {"models": models}}))
    return folder


def test_expert_and_merge_guarantees(tmp_path: Path) -> None:
    a = _expert(tmp_path / "a", 1.0, 1e-5)
    b = _expert(tmp_path / "b", 4.0, 1e-4)
    plain = _expert(tmp_path / "plain", None)
    assert dp_guarantee(a).epsilon == 1.0 and dp_guarantee(a).experts == 1
    merged = dp_guarantee(_merge(tmp_path / "m", [a, b]))
    assert (merged.epsilon, merged.delta, merged.experts) == (4.0, 1e-4, 2)  # the largest of the inputs
    assert "merge of 2" in merged.label and "ε = 4.00" in merged.label
    assert dp_guarantee(_merge(tmp_path / "mixed", [a, plain])) is None  # one input without DP
    assert dp_guarantee(plain) is None
    assert dp_guarantee(tmp_path) is None  # a base model folder: no private training at all


def test_unreadable_merge_manifest_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "merge.json").write_text("{not json")
    with pytest.raises(MedmergeError, match="merge.json: cannot read the merge's inputs"):
        dp_guarantee(tmp_path)


def test_verdict_shows_the_dp_column_only_when_some_model_has_a_guarantee() -> None:
    config = ExperimentConfig(
        experts=[{"name": "a", "data": ["jsonl:a.jsonl"]}, {"name": "b", "data": ["jsonl:b.jsonl"]}],
        methods=["linear"],
    )
    validation = _validation({"a": 2.0, "b": 2.1, "multitask": 1.8, "linear-full": 1.9})
    losses = {"a": 2.0, "b": 2.4, "multitask": 1.8, "linear": 1.9}
    plain = _evaluation(losses, losses)
    assert "differential privacy" not in table_markdown(verdict(config, validation, plain))
    labels = {
        "a": "ε = 1.00, δ = 1e-04",
        "b": "ε = 2.00, δ = 1e-04",
        "linear": "ε = 2.00, δ = 1e-04, merge of 2",
    }
    private = replace(plain, models=tuple(replace(m, dp=labels.get(m.name)) for m in plain.models))
    v = verdict(config, validation, private)
    table = table_markdown(v)
    assert "differential privacy" in table.splitlines()[0]
    assert "| ε = 2.00, δ = 1e-04, merge of 2 |" in table and "| – |" in table  # multitask: no DP
    assert POST_PROCESSING in summary_lines(v)
    assert v.to_json()["table"][0]["dp"] == labels["a"]
