"""The embedded 135M model on a few real PubMedQA test questions (slow: loads the real model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medmerge.cli import main


@pytest.mark.slow
def test_embedded_model_on_real_questions(shared_datasets: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(
        "MEDMERGE_CACHE", os.environ.get("MEDMERGE_USER_CACHE") or str(Path.home() / ".cache" / "medmerge")
    )
    spec = f"pubmedqa:{shared_datasets / 'pubmedqa_ori_pqal.json'}"
    out = tmp_path / "eval"
    argv = [
        "evaluate", "smollm2-135m", "--data", spec, "--max-examples", "4", "--max-new-tokens", "24",
        "--batch-size", "4", "--threads", "1", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
        "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    cell = json.loads((out / "results.json").read_text())["results"]["smollm2-135m"]["pubmedqa"]
    assert all(a.strip() for a in cell["answers"])  # an instruction model answers every question
    assert 1.0 < cell["metrics"]["loss"]["mean"] < 6.0  # far below log(49152) ≈ 10.8 of a uniform guess
    assert 0.0 < cell["metrics"]["rougeL"]["mean"] < 1.0
    assert 0.2 < cell["metrics"]["bertscore_f1"]["mean"] < 1.0
