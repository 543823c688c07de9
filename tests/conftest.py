"""Session fixtures: tiny random models (built once), the shared real datasets, an isolated cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny import build_tiny_llama, build_tiny_t5

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama (causal) model with tokenizer and chat template. Do not modify."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random T5 (seq2seq, untied) model with tokenizer. Do not modify."""
    return build_tiny_t5(tmp_path_factory.mktemp("models") / "tiny-t5")


@pytest.fixture(scope="session")
def tiny_qa_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small JSONL Q&A set (40 pairs, 8 distinct answers) that a tiny model can memorise."""
    topics = ["diabetes", "asthma", "influenza", "anemia", "hypertension", "migraine", "eczema", "gout"]
    path = tmp_path_factory.mktemp("data") / "tiny_qa.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            topic = topics[i % len(topics)]
            row = {"question": f"What is {topic} ? (case {i})", "answer": f"{topic} is a disease."}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real datasets folder (../shared/datasets); tests using it skip where it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATASETS} (they live beside the project in shared/)")
    return SHARED_DATASETS


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point MEDMERGE_CACHE at a temp folder, except for the embedded model, which is expensive to build.

    Tests that need the embedded 135M model (marked slow) use the user's cache via `embedded_cache`
    (MEDMERGE_USER_CACHE remembers it). Both variables are restored when the session ends.
    """
    with pytest.MonkeyPatch.context() as patch:
        if "MEDMERGE_USER_CACHE" not in os.environ:
            patch.setenv("MEDMERGE_USER_CACHE", os.environ.get("MEDMERGE_CACHE", ""))
        patch.setenv("MEDMERGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def embedded_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """MEDMERGE_CACHE set to the user's cache (where the embedded model is built once) for one test."""
    cache = os.environ.get("MEDMERGE_USER_CACHE") or str(Path.home() / ".cache" / "medmerge")
    monkeypatch.setenv("MEDMERGE_CACHE", cache)
    return Path(cache)
