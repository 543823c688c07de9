"""Answer-time decoding: one `Decoding` honoured by every engine, the repeat stop, and the config."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from medmerge.config import AnswerConfig, validate_config
from medmerge.config.answer import ANSWER_DECODING, GREEDY, Decoding
from medmerge.errors import MedmergeError
from medmerge.export.common import RepeatWatch, banned_ngram_tokens
from medmerge.export.engines import answer_batch, open_engine, prompt_ids, stream_text
from medmerge.export.exporter import export_model

QUESTIONS = ["What is diabetes?", "How to prevent influenza?", "Is hypertension inherited?"]
SETTINGS = [
    Decoding(repetition_penalty=1.3),
    Decoding(no_repeat_ngram_size=2),
    Decoding(repetition_penalty=1.2, no_repeat_ngram_size=3),
]
SAMPLED = Decoding(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=3)


@pytest.fixture(scope="module")
def torch_engine(sharp_llama):
    return open_engine(sharp_llama, "torch", threads=1)


@pytest.fixture(scope="module")
def llama_ct2(sharp_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "llama-ct2-decoding"
    export_model(str(sharp_llama), "ct2", out, quantization="float32", threads=1)
    return out


def test_answer_config_defaults_and_partial_decoding(tmp_path):
    assert AnswerConfig().decoding == ANSWER_DECODING and not ANSWER_DECODING.plain_argmax
    assert GREEDY.plain_argmax and GREEDY.label() == "greedy"
    config = validate_config({"decoding": {"temperature": 0.7}}, AnswerConfig, "answer.yaml")
    assert config.decoding == ANSWER_DECODING.model_copy(update={"temperature": 0.7})
    with pytest.raises(MedmergeError, match="decoding.top_p"):
        validate_config({"decoding": {"top_p": 0}}, AnswerConfig, "answer.yaml")
    with pytest.raises(MedmergeError, match="decoding.beam"):
        validate_config({"decoding": {"beam": 4}}, AnswerConfig, "answer.yaml")


def _by_definition(engine, prompt, n, decoding):
    """Reference decoding without a KV cache: full forward each step, penalty / n-gram ban on the answer."""
    import torch

    ids: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = engine.model(input_ids=torch.tensor([prompt + ids])).logits[0, -1].clone()
            seen = sorted(set(ids))
            logits[seen] = torch.where(
                logits[seen] < 0,
                logits[seen] * decoding.repetition_penalty,
                logits[seen] / decoding.repetition_penalty,
            )
            logits[banned_ngram_tokens(ids, decoding.no_repeat_ngram_size)] = -torch.inf
            ids.append(int(logits.argmax()))
            if ids[-1] in engine.eos:
                break
    return ids


def test_torch_stream_follows_the_definition(torch_engine):
    """Penalties and n-gram bans act on the answer's ids (not the prompt's), as CTranslate2 does."""
    engine = torch_engine
    prompt = prompt_ids(engine, QUESTIONS[1])
    greedy = list(engine.stream_ids(prompt, 20))
    for decoding in SETTINGS:
        ids = list(engine.stream_ids(prompt, 20, decoding))
        assert ids == _by_definition(engine, prompt, 20, decoding), decoding.label()
        assert ids != greedy  # the setting changes the answer on this model
    n = 2
    ids = list(engine.stream_ids(prompt, 24, Decoding(no_repeat_ngram_size=n)))
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    assert len(grams) == len(set(grams))


def test_sampling_is_seeded_and_batch_equals_stream(torch_engine):
    engine = torch_engine
    prompts = [prompt_ids(engine, q) for q in QUESTIONS]
    first = [list(engine.stream_ids(p, 16, SAMPLED)) for p in prompts]
    assert first == [list(engine.stream_ids(p, 16, SAMPLED)) for p in prompts]  # same seed, same answer
    other = [list(engine.stream_ids(p, 16, SAMPLED.model_copy(update={"seed": 4}))) for p in prompts]
    assert other != first
    for decoding in [GREEDY, *SETTINGS, SAMPLED]:
        streamed = [list(engine.stream_ids(p, 16, decoding)) for p in prompts]
        assert engine.generate_batch(prompts, 16, decoding) == streamed, decoding.label()


def test_ct2_honours_the_same_settings(torch_engine, llama_ct2):
    """CTranslate2's own repetition penalty and n-gram ban give the torch engine's answers (float32)."""
    ct2 = open_engine(llama_ct2, threads=1)
    prompts = [prompt_ids(torch_engine, q) for q in QUESTIONS]
    for decoding in SETTINGS:
        expected = [list(torch_engine.stream_ids(p, 16, decoding)) for p in prompts]
        assert [list(ct2.stream_ids(p, 16, decoding)) for p in prompts] == expected, decoding.label()
        assert ct2.generate_batch(prompts, 16, decoding) == expected, decoding.label()
    # CTranslate2 samples, but its seed does not make sampling repeatable (OpenNMT/CTranslate2#1757)
    sampled = [list(ct2.stream_ids(p, 16, SAMPLED)) for p in prompts]
    assert all(len(ids) == 16 or ids[-1] in ct2.eos for ids in sampled)


def test_repeat_watch_and_ngram_ban():
    watch = RepeatWatch(3)
    fired = [watch.push(t) for t in [1, 2, 3, 4, 1, 2, 5, 1, 2, 3]]
    assert fired == [False] * 9 + [True]  # (1, 2, 3) came back
    assert not any(RepeatWatch(0).push(t) for t in [7] * 20)
    assert banned_ngram_tokens([5, 6, 7, 5, 6], 3) == [7]
    assert banned_ngram_tokens([5, 6, 7, 5, 6], 1) == [5, 6, 7]
    assert banned_ngram_tokens([5, 6], 3) == []


class _LoopingEngine:
    """Answers 'a b c a b c …' forever: a degenerate loop."""

    kind, eos = "causal", [0]

    class tokenizer:  # lower-case: mimics the engine attribute
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return "".join(" " + "abc"[t - 1] for t in ids)

    def __init__(self):
        self.closed = False

    def stream_ids(self, prompt, n, decoding=GREEDY):
        try:
            for i in range(n):
                yield [1, 2, 3][i % 3]
        finally:
            self.closed = True

    def generate_batch(self, prompts, n, decoding=GREEDY):
        return [list(self.stream_ids(p, n, decoding)) for p in prompts]


def test_stream_stops_once_the_answer_repeats_itself():
    engine = _LoopingEngine()
    stream = stream_text(engine, [], 100, Decoding(stop_repeat_tokens=4))
    assert "".join(stream) == " a b c a b c a" and stream.finish_reason == "repeat"
    assert engine.closed  # the engine's decoding loop was ended, not drained
    assert stream.tokens == answer_batch(engine, [[]], 100, Decoding(stop_repeat_tokens=4))[0]
    plain = stream_text(engine, [], 10)
    assert len("".join(plain).split()) == 10 and plain.finish_reason == "length"


def test_llama_cpp_receives_the_same_settings(monkeypatch, tmp_path):
    """llama.cpp is optional (not installed here): a stand-in `llama_cpp` module records what the engine
    asks of it, so the mapping Decoding → Llama.generate (and its logits processor) is checked."""
    calls = []
    context = [1, 4, 5, 4]  # prompt [1], then the answer so far: 4 5 4

    class Llama:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def reset(self):
            pass

        def set_seed(self, seed):
            calls.append(("seed", seed))

        def generate(self, tokens, **kwargs):
            calls.append(("generate", kwargs))
            scores = np.array([2.0, -2.0, 0, 0, 2.0, -2.0, 0, 0, 0, 0], np.float32)
            for processor in kwargs.get("logits_processor") or []:
                scores = processor(np.array(context, np.intc), scores)
            calls.append(("scores", scores.tolist()))
            yield 7
            yield 2

    fake = types.ModuleType("llama_cpp")
    fake.Llama, fake.LogitsProcessorList = Llama, list
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    monkeypatch.setattr("medmerge.export.llamacpp_engine.llama_cpp_available", lambda: True)
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=2, eos_token="</s>")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda folder: tokenizer)
    from medmerge.export.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(tmp_path, "m.gguf", threads=1, n_ctx=512)
    assert list(engine.stream_ids([1], 8)) == [7, 2]
    last = lambda kind: next(c[1] for c in reversed(calls) if c[0] == kind)  # noqa: E731
    assert last("generate") == {"repeat_penalty": 1.0, "top_k": 1, "temp": 0.0, "reset": True}
    assert list(engine.stream_ids([1], 8, Decoding(no_repeat_ngram_size=2, repetition_penalty=2.0))) == [7, 2]
    # answer 4 5 4: ids 4 and 5 penalized (÷2 / ×2), 5 banned (would repeat the bigram 4 5), 1 (prompt) kept
    assert last("scores") == [2.0, -2.0, 0, 0, 1.0, -np.inf, 0, 0, 0, 0]
    list(engine.stream_ids([1], 8, SAMPLED))
    assert ("seed", 3) in calls[-4:]
    options = last("generate")
    assert {k: options[k] for k in ("top_k", "top_p", "temp", "repeat_penalty")} == {
        "top_k": 0,
        "top_p": 0.9,
        "temp": 0.7,
        "repeat_penalty": 1.0,
    }


@pytest.mark.slow
def test_real_model_no_longer_loops_on_the_reported_question(embedded_cache):
    """The reported loop: SmolLM2-135M, greedy, repeats a list item until the limit; the defaults do not."""
    from medmerge.evaluate.metrics import repetition_rates

    engine = open_engine("smollm2-135m", "torch", threads=1)
    prompt = prompt_ids(engine, "What are the symptoms of type 2 diabetes?")
    greedy = stream_text(engine, prompt, 128)
    greedy_text = "".join(greedy)
    answer = stream_text(engine, prompt, 128, ANSWER_DECODING)
    text = "".join(answer)
    assert greedy.finish_reason == "length" and repetition_rates([greedy_text])[0] > 0.2
    assert repetition_rates([text])[0] < 0.05 and "diabetes" in text.lower()
