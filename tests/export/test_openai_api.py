"""`medmerge serve` speaks the OpenAI API: the official `openai` client against a real local server."""

from __future__ import annotations

import threading
import time

import pytest

from medmerge.config import DEFAULT_NOTICE, AnswerConfig
from medmerge.export.engines import open_engine, prompt_ids, stream_text
from medmerge.export.serve import create_app
from tests.export.webdriver import serve_in_thread

openai = pytest.importorskip("openai")

QUESTION = "What are the symptoms of asthma?"
NOTICE = "\n\n" + DEFAULT_NOTICE
CONFIG = AnswerConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(sharp_llama):
    return open_engine(sharp_llama, threads=1)


@pytest.fixture(scope="module")
def server(engine):
    with serve_in_thread(create_app(engine, CONFIG, "/models/tiny")) as base:
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="local", max_retries=0, timeout=60)


def alone(engine, question: str, n: int = 12, decoding=CONFIG.decoding):
    stream = stream_text(engine, prompt_ids(engine, question), n, decoding)
    return "".join(stream), stream


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "medmerge"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_completion_ends_with_the_notice(client, engine):
    answer, stream = alone(engine, QUESTION)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}])
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == answer + NOTICE
    assert reply.choices[0].finish_reason == ("length" if stream.finish_reason == "length" else "stop")
    prompt = prompt_ids(engine, QUESTION)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(stream.tokens))


def test_streamed_chat_completion(client, engine):
    answer, stream = alone(engine, QUESTION)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == answer + NOTICE
    assert len([d for d in deltas if d]) > 2  # piece by piece, not one block
    assert deltas[-2] == NOTICE  # the notice is the final content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(stream.tokens)


def test_request_options_change_the_decoding(client, engine):
    sampled = CONFIG.decoding.model_copy(update={"temperature": 0.8, "top_p": 0.9, "seed": 7})
    expected, _ = alone(engine, QUESTION, 8, sampled)
    for _ in range(2):  # seeded: the same answer every time
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=8,
            temperature=0.8,
            top_p=0.9,
            seed=7,
        )
        assert reply.choices[0].message.content == expected + NOTICE
    greedy = {"repetition_penalty": 1.0, "stop_repeat_tokens": 0}
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=500, extra_body=greedy
    )
    expected, _ = alone(engine, QUESTION, 12, CONFIG.decoding.model_copy(update=greedy))  # capped at 12
    assert reply.choices[0].message.content == expected + NOTICE


def test_conversation_goes_through_the_chat_template(client, engine):
    first, _ = alone(engine, QUESTION)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first + NOTICE},  # as the client received it
        {"role": "user", "content": [{"type": "text", "text": "And how is it treated?"}]},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages)
    text = engine.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": first},  # the notice is not fed back to the model
            {"role": "user", "content": "And how is it treated?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = "".join(stream_text(engine, prompt, 12, CONFIG.decoding))
    assert reply.choices[0].message.content == expected + NOTICE
    assert reply.usage.prompt_tokens == len(prompt)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"model": "gpt-4o"}, "NotFoundError", "not served here"),
        ({"messages": [{"role": "user", "content": "  "}]}, "BadRequestError", "question: empty"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, "BadRequestError", "last message"),
        ({"n": 2}, "BadRequestError", "only 1 answer"),
        ({"stop": ["\n"]}, "BadRequestError", "stop: not supported"),
        ({"presence_penalty": 0.5}, "BadRequestError", "use repetition_penalty"),
        ({"temperature": 5.0}, "BadRequestError", "temperature"),
        ({"max_tokens": 0}, "BadRequestError", "max_tokens"),
    ],
)
def test_bad_requests_get_openai_errors(client, options, error, message):
    request = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], **options}
    with pytest.raises(getattr(openai, error)) as err:
        client.chat.completions.create(**request)
    assert message in err.value.body["message"]


class _Gated:
    """The real engine, but each answer waits for `gate` before its first token (to hold the queue)."""

    def __init__(self, engine):
        self._engine, self.gate, self.entered = engine, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream_ids(self, prompt, n, decoding):
        self.entered.set()
        assert self.gate.wait(60)
        yield from self._engine.stream_ids(prompt, n, decoding)


def test_full_queue_refuses_with_429_and_retry_after(engine):
    gated = _Gated(engine)
    app = create_app(gated, AnswerConfig(max_new_tokens=6, max_queued=1), "tiny")
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="local", max_retries=0, timeout=60)
        ask = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}]}
        replies: list = []
        first = threading.Thread(target=lambda: replies.append(client.chat.completions.create(**ask)))
        first.start()
        assert gated.entered.wait(30)  # answering the first request
        second = threading.Thread(target=lambda: replies.append(client.chat.completions.create(**ask)))
        second.start()
        while app.state.answers.admitted < 2:  # the second waits in the queue
            threading.Event().wait(0.02)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(**ask, stream=True)
        assert int(err.value.response.headers["retry-after"]) >= 1
        gated.gate.set()
        first.join(60)
        second.join(60)
        expected, _ = alone(engine, QUESTION, 6)
        assert [r.choices[0].message.content for r in replies] == [expected + NOTICE] * 2
        assert client.chat.completions.create(**ask).choices[0].message.content == expected + NOTICE


class _Endless:
    """The real engine's tokenizer, but an answer that never ends (one token every 10 ms), counted."""

    def __init__(self, engine):
        self.kind, self.tokenizer, self.eos, self.name = engine.kind, engine.tokenizer, engine.eos, "endless"
        self.produced = 0
        self.words = engine.tokenizer("the patient has a cough and a fever", add_special_tokens=False)[
            "input_ids"
        ]

    def stream_ids(self, prompt, n, decoding):
        for _ in range(n):
            self.produced += 1
            threading.Event().wait(0.01)
            yield self.words[self.produced % len(self.words)]


def test_a_client_that_leaves_frees_the_engine(engine):
    import httpx

    endless = _Endless(engine)
    config = AnswerConfig(max_new_tokens=4096, decoding={"stop_repeat_tokens": 0})
    app = create_app(endless, config, "tiny")
    with serve_in_thread(app) as base:
        body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the stream has started; now hang up
        deadline = time.monotonic() + 30
        while app.state.answers.admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.answers.admitted == 0  # the worker stopped decoding for the departed client
        stopped_at = endless.produced
        time.sleep(0.3)
        assert endless.produced == stopped_at < 4096
