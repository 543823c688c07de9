"""The DP guarantee a report shows: an expert's own; a merge's computed from its method and its
inputs' data (post-processing, composition, statistics, none); none without DP."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from medmerge.config import EvaluateConfig, ExperimentConfig
from medmerge.errors import MedmergeError
from medmerge.evaluate.privacy import DP_NOTE, dp_guarantee, refuse_training_split
from medmerge.evaluate.records import ModelRef
from medmerge.pipeline.verdict import summary_lines, table_markdown, verdict
from medmerge.train.ledger import gaussian_release, spent_epsilon
from medmerge.train.privacy import PrivacyRecord
from tests.pipeline.test_verdict import _evaluation, _validation


def _expert(
    folder: Path, sigma: float | None, delta: float = 1e-4, origin: str | None = "site-a", q: float = 0.01
) -> Path:
    """An expert folder whose manifest carries a DP record of 100 steps at σ (or `privacy: null`) and
    a data record with the origin fingerprint `origin` (None: a manifest from before fingerprints)."""
    folder.mkdir(parents=True)
    record = None
    if sigma is not None:
        history = ((sigma, q, 100),)
        epsilon = spent_epsilon(history, delta, "prv")
        record = PrivacyRecord(epsilon, delta, "prv", sigma, q, 100, 1.0, 800, 8, history=history).to_json()
    data = [{"spec": "jsonl:x.jsonl"} | ({"origin_fingerprint": origin} if origin else {})]
    (folder / "manifest.json").write_text(
        json.dumps({"kind": "expert", "inputs": {"data": data}, "privacy": record})
    )
    return folder


def _merge(folder: Path, inputs: list[Path], method: str = "linear") -> Path:
    folder.mkdir(parents=True)
    models = [{"path": str(p), "adapter": True} for p in inputs]
    (folder / "merge.json").write_text(
        json.dumps({"inputs": {"models": models}, "config": {"method": method}})
    )
    return folder


def _history(folder: Path) -> list:
    return [tuple(h) for h in json.loads((folder / "manifest.json").read_text())["privacy"]["history"]]


def test_expert_and_merge_guarantees(tmp_path: Path) -> None:
    a = _expert(tmp_path / "a", 2.0, 1e-5, origin="site-a")
    b = _expert(tmp_path / "b", 0.9, 1e-4, origin="site-b")
    plain = _expert(tmp_path / "plain", None)
    ea, eb = dp_guarantee(a).epsilon, dp_guarantee(b).epsilon
    assert ea < eb and dp_guarantee(a).experts == 1 and dp_guarantee(a).basis == "DP-SGD"
    merged = dp_guarantee(_merge(tmp_path / "m", [a, b]))
    # disjoint data (different origins), data-free: the largest ε of the inputs (at the largest δ)
    assert (merged.epsilon, merged.delta, merged.experts) == (eb, 1e-4, 2)
    assert merged.basis == "post-processing" and "disjoint" in merged.reason
    assert merged.label == f"ε = {eb:.2f}, δ = 1e-04, merge of 2, post-processing"
    assert dp_guarantee(_merge(tmp_path / "mixed", [a, plain])) is None  # one input without DP
    assert dp_guarantee(plain) is None
    assert dp_guarantee(tmp_path) is None  # a base model folder: no private training at all


def test_overlapping_data_composes(tmp_path: Path) -> None:
    """Two experts on the same origin (or one without a fingerprint): their histories compose."""
    a = _expert(tmp_path / "a", 1.0, origin="shared")
    b = _expert(tmp_path / "b", 1.0, origin="shared")
    c = _expert(tmp_path / "c", 1.0, origin=None)
    alone = dp_guarantee(a).epsilon
    for name, inputs in [("ab", [a, b]), ("ac", [a, c])]:
        g = dp_guarantee(_merge(tmp_path / name, inputs, "ties"))
        assert g.epsilon == spent_epsilon(_history(a) * 2, 1e-4, "prv") > 1.2 * alone
        assert g.basis == "composed (overlapping data)" and "overlap" in g.reason


def test_methods_that_read_data_or_plain_statistics_have_no_guarantee(tmp_path: Path) -> None:
    a = _expert(tmp_path / "a", 1.0, origin="site-a")
    b = _expert(tmp_path / "b", 1.0, origin="site-b")
    pp = dp_guarantee(_merge(tmp_path / "pp", [a, b], "regmean_plus_plus"))
    assert math.isinf(pp.epsilon) and pp.label == "none: reads training data"
    assert "regmean_plus_plus reads the experts' training data" in pp.reason
    for folder in (a, b):  # statistics as `medmerge stats` writes them today: no noise
        (folder / "statistics.json").write_text(json.dumps({"format": "medmerge-statistics/1"}))
    rm = dp_guarantee(_merge(tmp_path / "rm", [a, b], "regmean"))
    assert math.isinf(rm.epsilon) and rm.label == "none: statistics without noise"
    nested = dp_guarantee(_merge(tmp_path / "nested", [_merge(tmp_path / "inner", [a, b], "fisher"), a]))
    assert math.isinf(nested.epsilon)  # a merge of a Fisher merge read the statistics too
    assert dp_guarantee(_merge(tmp_path / "lin", [a, b])).epsilon == dp_guarantee(a).epsilon


def test_noised_statistics_compose_with_each_sites_expert(tmp_path: Path) -> None:
    a = _expert(tmp_path / "a", 1.0, origin="site-a")
    b = _expert(tmp_path / "b", 1.5, origin="site-b")
    for folder, sigma in ((a, 4.0), (b, 8.0)):
        release = gaussian_release(sigma, what="statistics gram").to_json()
        (folder / "statistics.json").write_text(json.dumps({"privacy": release}))
    g = dp_guarantee(_merge(tmp_path / "rm", [a, b], "regmean"))
    per_site = [
        spent_epsilon(_history(a) + [(4.0, 1.0, 1)], 1e-4, "prv"),
        spent_epsilon(_history(b) + [(8.0, 1.0, 1)], 1e-4, "prv"),
    ]
    assert g.epsilon == max(per_site) > dp_guarantee(a).epsilon
    assert g.basis == "composed with statistics"


def test_training_split_of_a_dp_model_is_refused() -> None:
    dp = ModelRef(name="dp", path="x", checksum="0", kind="causal", dp="ε = 1.00, δ = 1e-04")
    plain = ModelRef(name="plain", path="y", checksum="1", kind="causal")
    refuse_training_split([plain], "train")
    refuse_training_split([plain, dp], "test")
    refuse_training_split([plain, dp], None)  # out-of-domain sets only
    with pytest.raises(MedmergeError, match="evaluate.split: train scores the private training pairs of dp"):
        refuse_training_split([plain, dp], "train")


def test_evaluate_refuses_the_training_split_of_a_dp_expert(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    from medmerge.evaluate.runner import evaluate
    from medmerge.train import train_expert
    from tests.train.helpers import tiny_config

    config = tiny_config(tiny_llama, tiny_qa_jsonl, privacy={"noise_multiplier": 1.0}, max_steps=1,
                         eval_every=0, autocast="off")  # fmt: skip
    train_expert(config, tmp_path / "dp", progress=False)
    settings = EvaluateConfig(data=[f"jsonl:{tiny_qa_jsonl}"], split="train", generate=False)
    with pytest.raises(MedmergeError, match="evaluate.split: train"):
        evaluate([str(tmp_path / "dp")], settings, cache_dir=None, progress=False)


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
    assert DP_NOTE in summary_lines(v)
    assert v.to_json()["table"][0]["dp"] == labels["a"]
