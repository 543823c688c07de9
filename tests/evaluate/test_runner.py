"""End to end: `medmerge evaluate` over models × sets, the cache, and `medmerge report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmerge.cli import main
from medmerge.config import EvaluateConfig
from medmerge.errors import MedmergeError
from medmerge.evaluate import runner
from medmerge.evaluate.records import Evaluation
from medmerge.evaluate.report import render_report
from tests.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def second_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-b", seed=1)


def _argv(models: list[str], spec: str, out: Path, cache: Path) -> list[str]:
    return [
        "evaluate", *models, "--data", spec, "--ood", spec, "--fractions", "0.5", "0.25", "0.25",
        "--max-examples", "6", "--max-new-tokens", "6", "--batch-size", "4", "--bootstrap-resamples", "200",
        "--examples", "2", "--out", str(out), "--cache-dir", str(cache), "--quiet",
    ]  # fmt: skip


def test_evaluate_two_models_then_cache_hit_then_report(
    tiny_llama: Path, second_llama: Path, tiny_qa_jsonl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, out, cache = f"jsonl:{tiny_qa_jsonl}", tmp_path / "eval", tmp_path / "cache"
    argv = _argv([f"a={tiny_llama}", f"b={second_llama}"], spec, out, cache)
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [d["domain"] for d in results["datasets"]] == ["in-domain", "out-of-domain"]
    assert [d["split"] for d in results["datasets"]] == ["test", None]
    assert results["datasets"][1]["n"] == 6  # out-of-domain: the whole file, first 6
    cell = results["results"]["a"]["tiny_qa"]
    assert set(cell["metrics"]) >= {
        "loss",
        "perplexity",
        "rougeL",
        "bleu",
        "chrf",
        "bertscore_f1",
        "repetition",
    }
    for ci in cell["metrics"].values():
        assert ci["low"] <= ci["mean"] <= ci["high"]
    assert len(cell["answers"]) == results["datasets"][0]["n"]
    assert results["cache"]["misses"] == 2 * 2 * 3 and results["cache"]["hits"] == 0  # models × sets × stages
    tests = {(c["dataset"], c["metric"]) for c in results["comparisons"]}
    assert ("tiny_qa", "loss") in tests and ("tiny_qa-2", "bertscore_f1") in tests
    assert Evaluation.from_json(results).to_json() == results  # the typed records keep the file's shape
    report = (out / "report.md").read_text()
    assert "**" in report and "Paired bootstrap" in report and "tiny_qa-2 (OOD, n=6)" in report
    for png in ("heatmap.png", "averages.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # second run: every stage from the cache, the models are never loaded
    def no_load(*args, **kwargs):
        raise AssertionError("model loaded despite a full cache")

    monkeypatch.setattr(runner, "load_model", no_load)
    assert main([*argv, "--overwrite"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["cache"] == {"dir": str(cache), "hits": 12, "misses": 0}
    assert again["results"]["b"]["tiny_qa-2"]["metrics"] == results["results"]["b"]["tiny_qa-2"]["metrics"]
    assert all(all(c["cached"].values()) for m in again["results"].values() for c in m.values())

    # `medmerge report DIR` re-renders from results.json alone
    before = (out / "report.md").read_text()
    for name in ("report.md", "heatmap.png", "averages.png"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == before
    assert (out / "heatmap.png").is_file() and (out / "averages.png").is_file()


def test_loss_only_and_bad_input(tiny_llama: Path, tiny_qa_jsonl: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "loss"
    argv = [
        "evaluate", str(tiny_llama), "--ood", f"jsonl:{tiny_qa_jsonl}", "--max-examples", "4",
        "--loss-only", "--no-cache", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]["tiny-llama"]["tiny_qa"]["metrics"]) == {"loss", "perplexity"}
    assert (out / "heatmap.png").is_file()
    assert main(argv) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_llama), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "no question sets" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_llama), "--data", "nope:x", "--out", str(tmp_path / "y")]) == 2
    assert "unknown kind 'nope'" in capsys.readouterr().err


def test_report_refuses_a_folder_without_results(tmp_path: Path) -> None:
    with pytest.raises(MedmergeError, match="results.json: cannot read"):
        render_report(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(MedmergeError, match="medmerge-evaluation"):
        render_report(tmp_path)
    (tmp_path / "results.json").write_text('{"format": "medmerge-evaluation/1", "models": []}')
    with pytest.raises(MedmergeError, match="results.json: malformed evaluation"):
        render_report(tmp_path)


def test_eval_set_names_and_domains(tiny_qa_jsonl: Path) -> None:
    config = EvaluateConfig(
        data=["medquad:/d/MedQuAD.zip", f"jsonl:{tiny_qa_jsonl}"], ood=[f"jsonl:{tiny_qa_jsonl}"]
    )
    sets = runner.eval_sets(config)
    assert [(s.name, s.split, s.domain) for s in sets] == [
        ("medquad", "test", "in-domain"),
        ("tiny_qa", "test", "in-domain"),
        ("tiny_qa-2", None, "out-of-domain"),
    ]


def test_yaml_config_with_flag_override(
    tiny_llama: Path, tiny_qa_jsonl: Path, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text(f"ood: ['jsonl:{tiny_qa_jsonl}']\nmax_examples: 5\ngenerate: false\nexamples: 1\n")
    out = tmp_path / "out"
    argv = ["evaluate", str(tiny_llama), "--config", str(config), "--max-examples", "3", "--out", str(out)]
    assert main([*argv, "--no-cache", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["max_examples"] == 3 and results["settings"]["generate"] is False
    assert results["datasets"][0]["n"] == 3 and len(results["examples"]["tiny_qa"]) == 1
    config.write_text("max_new_tokenz: 3\n")
    assert main([*argv, "--overwrite"]) == 2
    assert "max_new_tokenz" in capsys.readouterr().err


def test_each_model_is_freed_before_the_next_loads(
    tiny_llama: Path, second_llama: Path, tiny_qa_jsonl: Path, monkeypatch
) -> None:
    """No reference cycle outlives a model (transformers' output capture makes one; unpin_forwards)."""
    import gc
    import weakref

    import torch

    loaded: list[weakref.ref] = []
    alive_at_next_load: list[bool] = []
    real_load = runner.load_model

    def load_model(*args, **kwargs):
        alive_at_next_load.extend(ref() is not None for ref in loaded)
        model = real_load(*args, **kwargs)
        layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        loaded.append(weakref.ref(layer))  # the top-level object dies; its layers stay in the cycle
        return model

    monkeypatch.setattr(runner, "load_model", load_model)
    config = EvaluateConfig(ood=[f"jsonl:{tiny_qa_jsonl}"], max_examples=2, generate=False)
    gc.disable()  # no collection: only reference counting can free the first model
    try:
        runner.evaluate([f"a={tiny_llama}", f"b={second_llama}"], config, cache_dir=None, progress=False)
    finally:
        gc.enable()
    assert alive_at_next_load == [False]


def test_generation_on_the_first_questions_only(tiny_llama: Path, tiny_qa_jsonl: Path) -> None:
    config = EvaluateConfig(
        ood=[f"jsonl:{tiny_qa_jsonl}"],
        max_examples=6,
        generate_examples=2,
        max_new_tokens=4,
        bootstrap_resamples=100,
        examples=3,
    )
    evaluation = runner.evaluate([f"a={tiny_llama}"], config, cache_dir=None, progress=False)
    cell = evaluation.cell("a", evaluation.datasets[0].name)
    assert len(cell.per_item["loss"]) == 6  # every question's loss
    assert len(cell.answers) == 2 and len(cell.per_item["rougeL"]) == 2  # answers for the first two
    shown = evaluation.examples[evaluation.datasets[0].name]
    assert [e.answers["a"] is not None for e in shown] == [True, True, False]
