"""`medmerge serve` under load: 16 concurrent OpenAI clients against a real server process on 127.0.0.1.

Promises checked (tiny model, 16 new tokens, at most 4 requests waiting):
- every request is answered or refused with 429 and a Retry-After of at least 1 s;
- every answer is the one its prompt gets alone (distinct prompts with distinct answers: no tokens cross
  between streams), streamed or not, and ends with the safety notice;
- the process stays up and keeps answering, and its RSS after three rounds of 16 clients is within
  RSS_TOLERANCE_MIB of its RSS after a warm-up round.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medmerge.config import DEFAULT_NOTICE
from tests.export.webdriver import free_port, wait_http

openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

CLIENTS = 16
ROUNDS = 3
MAX_QUEUED = 4
RSS_TOLERANCE_MIB = 32  # measured: +0.5 MiB over 3 rounds (docs/serving.md); allocator noise stays far below
DISEASES = [
    "asthma", "diabetes", "gout", "anemia", "migraine", "eczema", "influenza", "hepatitis",
    "glaucoma", "psoriasis", "tuberculosis", "malaria", "scoliosis", "rickets", "measles", "lupus",
]  # fmt: skip
QUESTIONS = [f"What are the symptoms of {d}?" for d in DISEASES]


@pytest.fixture(scope="module")
def server(sharp_llama, tmp_path_factory):
    """`medmerge serve` in its own process (loopback, one torch thread)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        sys.executable, "-c", "import sys; from medmerge.cli import main; sys.exit(main())",
        "serve", str(sharp_llama), "--port", str(port), "--threads", "1",
        "--max-new-tokens", "16", "--max-queued", str(MAX_QUEUED),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 120)
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        process.terminate()
        process.wait(20)


def _client(base: str):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="local", max_retries=0, timeout=120)


def _ask(client, model: str, question: str, stream: bool) -> str:
    messages = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(model=model, messages=messages, stream=stream)
    if not stream:
        return reply.choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)


def _one_client(base: str, model: str, i: int, barrier: threading.Barrier, outcomes: list) -> None:
    """Client i: ask QUESTIONS[i] (streamed when i is even) once all clients are ready; record the outcome."""
    client = _client(base)  # each client its own connection pool
    barrier.wait()
    try:
        outcomes[i] = ("answer", _ask(client, model, QUESTIONS[i], stream=i % 2 == 0))
    except openai.RateLimitError as exc:
        outcomes[i] = ("429", exc.response.headers.get("retry-after"))
    except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
        outcomes[i] = ("error", repr(exc))


def test_sixteen_concurrent_clients(server, sharp_llama):
    process, base, log = server
    assert f"http://127.0.0.1:{base.rsplit(':', 1)[1]}/" in log.read_text()  # bound to loopback
    client, model = _client(base), Path(sharp_llama).name
    assert [m.id for m in client.models.list().data] == [model]
    alone = {q: _ask(client, model, q, stream=False) for q in QUESTIONS}  # one at a time: the reference
    assert len(set(alone.values())) == len(QUESTIONS)  # distinct prompts, distinct answers
    assert all(a.endswith("\n\n" + DEFAULT_NOTICE) for a in alone.values())
    assert all(
        _ask(client, model, q, stream=True) == alone[q] for q in QUESTIONS[:4]
    )  # streamed = not streamed
    rss_before = psutil.Process(process.pid).memory_info().rss

    rounds = []
    for _ in range(ROUNDS):
        barrier = threading.Barrier(CLIENTS)
        outcomes: list = [None] * CLIENTS

        start = time.monotonic()
        threads = [
            threading.Thread(target=_one_client, args=(base, model, i, barrier, outcomes))
            for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        rounds.append((time.monotonic() - start, outcomes))
        for i, (kind, value) in enumerate(outcomes):
            if kind == "answer":
                assert value == alone[QUESTIONS[i]], f"client {i}: not the answer its prompt gets alone"
            else:
                assert kind == "429" and int(value) >= 1, f"client {i}: {kind} {value}"
        assert process.poll() is None  # still up

    rss_after = psutil.Process(process.pid).memory_info().rss
    answered = [sum(kind == "answer" for kind, _ in outcomes) for _, outcomes in rounds]
    refused = [CLIENTS - a for a in answered]
    growth = (rss_after - rss_before) / 2**20
    print(
        f"\nload: {ROUNDS} rounds × {CLIENTS} clients, answered {answered}, refused (429) {refused}, "
        f"seconds {[round(s, 1) for s, _ in rounds]}; server RSS {rss_before / 2**20:.0f} → "
        f"{rss_after / 2**20:.0f} MiB ({growth:+.1f}, tolerance {RSS_TOLERANCE_MIB})"
    )
    assert all(a >= 1 for a in answered)
    assert growth <= RSS_TOLERANCE_MIB
    assert _ask(client, model, QUESTIONS[0], stream=True) == alone[QUESTIONS[0]]  # still answering, correctly
