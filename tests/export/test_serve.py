"""`medmerge serve`: the HTTP API, and the page end to end in headless Chromium (skips without it)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from medmerge.config import DEFAULT_NOTICE, AnswerConfig
from medmerge.config.answer import ANSWER_DECODING
from medmerge.export.engines import open_engine, prompt_ids, stream_text
from medmerge.export.serve import create_app, is_loopback
from tests.export.webdriver import ask_through_page, free_port, wait_http

QUESTION = "What are the symptoms of asthma?"


def _post(url: str, body: object) -> urllib.request.Request:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    return request


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


@pytest.fixture(scope="module")
def api(sharp_llama):
    """The app served by uvicorn in a thread on a free loopback port."""
    import uvicorn

    engine = open_engine(sharp_llama, threads=1)
    config = AnswerConfig(max_new_tokens=12)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, config, "tiny"), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_http(f"http://127.0.0.1:{port}/api/info", 20)
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(10)


def test_api_streams_the_answer_and_the_notice(api):
    base, engine = api
    with urllib.request.urlopen(_post(f"{base}/api/ask", {"question": QUESTION}), timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        chunks = []
        while chunk := response.read1(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode()
    answer = "".join(stream_text(engine, prompt_ids(engine, QUESTION), 12, ANSWER_DECODING))
    assert text == answer + "\n\n" + DEFAULT_NOTICE
    info = json.loads(urllib.request.urlopen(f"{base}/api/info").read())
    assert info == {"model": "tiny", "engine": "torch", "notice": DEFAULT_NOTICE}
    page = urllib.request.urlopen(f"{base}/").read().decode()
    assert '<textarea id="question"' in page and "getReader()" in page


@pytest.mark.parametrize(
    ("body", "message"), [({"question": "  "}, "question: empty"), ({"q": 1}, "expected a string")]
)
def test_api_rejects_bad_questions(api, body, message):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(_post(f"{api[0]}/api/ask", body), timeout=10)
    assert err.value.code == 400 and message in json.loads(err.value.read())["error"]


def test_page_in_headless_chromium(sharp_llama, tmp_path):
    page = ask_through_page(
        sharp_llama, ["--threads", "1", "--max-new-tokens", "12"], QUESTION, tmp_path, 180, "serve.png"
    )
    engine = open_engine(sharp_llama, threads=1)
    answer = "".join(stream_text(engine, prompt_ids(engine, QUESTION), 12, ANSWER_DECODING))
    assert " ".join(page.shown.split()) == " ".join((answer + "\n\n" + DEFAULT_NOTICE).split())
    shot = page.screenshot
    assert shot.stat().st_size > 5000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"http://127.0.0.1:{page.port}/" in page.server_log
