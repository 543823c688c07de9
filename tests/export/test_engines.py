"""Answer engines: same greedy answers from PyTorch and CTranslate2, streaming, engine choice."""

from __future__ import annotations

import pytest

from medmerge.errors import MedmergeError
from medmerge.export.engines import available_engines, open_engine, prompt_ids, stream_text
from medmerge.export.exporter import export_model

QUESTIONS = ["What is diabetes?", "How to prevent influenza?", "Is hypertension inherited?"]


@pytest.fixture(scope="module")
def llama_ct2(sharp_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "llama-ct2"
    export_model(str(sharp_llama), "ct2", out, quantization="float32", threads=1)
    return out


@pytest.fixture(scope="module")
def t5_ct2(tiny_t5, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "t5-ct2"
    export_model(str(tiny_t5), "ct2", out, quantization="float32", threads=1)
    return out


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_torch_and_ct2_give_the_same_greedy_answers(which, sharp_llama, tiny_t5, llama_ct2, t5_ct2):
    source, exported = (sharp_llama, llama_ct2) if which == "llama" else (tiny_t5, t5_ct2)
    torch_engine, ct2_engine = open_engine(source, "torch", threads=1), open_engine(exported, threads=1)
    assert ct2_engine.name == "ct2" and ct2_engine.kind == torch_engine.kind
    prompts = [prompt_ids(torch_engine, q) for q in QUESTIONS]
    assert prompts == [prompt_ids(ct2_engine, q) for q in QUESTIONS]
    batch_torch = torch_engine.generate_batch(prompts, 12)
    assert batch_torch == ct2_engine.generate_batch(prompts, 12)
    for prompt, expected in zip(prompts, batch_torch, strict=True):
        assert list(torch_engine.stream_ids(prompt, 12)) == expected
        assert list(ct2_engine.stream_ids(prompt, 12)) == expected
        assert len(expected) == 12 or expected[-1] in torch_engine.eos


def test_stream_text_yields_pieces_that_add_up_to_the_decoded_answer(sharp_llama):
    engine = open_engine(sharp_llama, "torch", threads=1)
    prompt = prompt_ids(engine, QUESTIONS[0])
    pieces = list(stream_text(engine, prompt, 20))
    ids = list(engine.stream_ids(prompt, 20))
    assert "".join(pieces) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(pieces) > 1  # token by token, not one block at the end
    assert all(pieces)


def test_stream_text_holds_back_incomplete_characters():
    class ByteEngine:  # a tokenizer whose tokens are single UTF-8 bytes: "é" is two tokens
        kind, eos = "causal", []

        class tokenizer:  # lower-case: mimics the engine attribute
            @staticmethod
            def decode(ids, skip_special_tokens=True):
                return bytes(ids).decode("utf-8", errors="replace")

        def stream_ids(self, prompt, n, decoding):
            yield from list("é!".encode())[:n]

    assert list(stream_text(ByteEngine(), [], 10)) == ["é", "!"]


def test_engine_choice(sharp_llama, llama_ct2):
    assert available_engines(sharp_llama) == ["torch", "torch-bf16"]
    assert available_engines(llama_ct2) == ["ct2"]
    assert open_engine(sharp_llama, threads=1).name == "torch"
    assert open_engine(sharp_llama, "torch-bf16", threads=1).name == "torch-bf16"
    with pytest.raises(MedmergeError, match="choices: auto, torch, torch-bf16, ct2, llama.cpp"):
        open_engine(sharp_llama, "vllm")
    with pytest.raises(MedmergeError, match="available for it: torch, torch-bf16"):
        open_engine(sharp_llama, "ct2")
