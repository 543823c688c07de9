"""The embedded SmolLM2-135M end to end: CTranslate2 int8 and GGUF q8_0 exports pass their agreement
check, and the exported model answers on the local page in headless Chromium (slow: minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
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
    from tests.export.test_serve import _browser
    from tests.export.webdriver import WebDriver, free_port, wait_http

    out = _exports / "ct2-int8"
    manifest = export_model("smollm2-135m", "ct2", out, quantization="int8_float32")
    a = manifest["agreement"]["ct2"]
    assert a["passed"] and a["token_match"] >= 0.75 and a["mean_abs_logprob_diff"] <= 0.25
    assert manifest["sizes"]["weights_ratio"] < 0.3
    assert manifest["conversion"]["tie_word_embeddings"] is True

    chromium, chromedriver = _browser()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "medmerge.cli", "serve", str(out), "--port", str(port),
         "--max-new-tokens", "48"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api/info", 180)
        browser = WebDriver(chromedriver, chromium, tmp_path / "profile")
        browser.get(f"http://127.0.0.1:{port}/")
        browser.type(browser.find("#question"), "What are the symptoms of diabetes?")
        browser.click(browser.find("#ask"))
        browser.wait_text("#status", "done", 300)
        shown = browser.text(browser.find("#answer"))
        shot = browser.screenshot(tmp_path / "serve-smollm2-ct2-int8.png")
        print(f"screenshot: {shot}")
    finally:
        if browser:
            browser.quit()
        server.terminate()
        server.communicate(timeout=10)
    assert " ".join(DEFAULT_NOTICE.split()) in " ".join(shown.split())
    answer = shown.split(DEFAULT_NOTICE[:20])[0].lower()
    assert len(answer.split()) >= 10 and any(w in answer for w in ("diabetes", "blood", "sugar", "glucose"))


def test_real_gguf_q8_0_export(user_cache, _exports):
    manifest = export_model("smollm2-135m", "gguf", _exports / "gguf-q8", quantization="q8_0")
    for a in manifest["agreement"].values():
        assert a["passed"] and a["token_match"] >= 0.75
    assert manifest["sizes"]["weights_ratio"] < 0.3
