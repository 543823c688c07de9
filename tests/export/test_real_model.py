"""The embedded SmolLM2-135M end to end: CTranslate2 int8 and GGUF q8_0 exports pass their agreement
check, and the exported model answers on the local page in headless Chromium (slow: minutes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medmerge.config import DEFAULT_NOTICE
from medmerge.export.exporter import export_model

pytestmark = pytest.mark.slow


@pytest.fixture
def user_cache(monkeypatch):
    """The user's model cache, where the embedded model is already materialised."""
    cache = os.environ.get("MEDMERGE_USER_CACHE") or str(Path.home() / ".cache" / "medmerge")
    monkeypatch.setenv("MEDMERGE_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def _exports(tmp_path_factory):
    return tmp_path_factory.mktemp("real-exports")


def test_real_ct2_int8_export_and_page(user_cache, _exports, tmp_path):
    from tests.export.webdriver import ask_through_page

    out = _exports / "ct2-int8"
    manifest = export_model("smollm2-135m", "ct2", out, quantization="int8_float32")
    a = manifest["agreement"]["ct2"]
    assert a["passed"] and a["token_match"] >= 0.75 and a["mean_abs_logprob_diff"] <= 0.25
    assert manifest["sizes"]["weights_ratio"] < 0.3
    assert manifest["conversion"]["tie_word_embeddings"] is True

    page = ask_through_page(
        out, ["--max-new-tokens", "48"], "What are the symptoms of diabetes?", tmp_path, 300,
        "serve-smollm2-ct2-int8.png",
    )  # fmt: skip
    shown = page.shown
    assert " ".join(DEFAULT_NOTICE.split()) in " ".join(shown.split())
    answer = shown.split(DEFAULT_NOTICE[:20])[0].lower()
    assert len(answer.split()) >= 10 and any(w in answer for w in ("diabetes", "blood", "sugar", "glucose"))


def test_real_gguf_q8_0_export(user_cache, _exports):
    manifest = export_model("smollm2-135m", "gguf", _exports / "gguf-q8", quantization="q8_0")
    for a in manifest["agreement"].values():
        assert a["passed"] and a["token_match"] >= 0.75
    assert manifest["sizes"]["weights_ratio"] < 0.3
