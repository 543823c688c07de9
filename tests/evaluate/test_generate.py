"""Batched generation: left padding and the KV cache give the answers of a plain argmax loop."""

from __future__ import annotations

import pytest
import torch

from medmerge.config import EvaluateSettings
from medmerge.evaluate.generate import encode_prompts, generate_answers
from medmerge.models import load_model, load_tokenizer

QUESTIONS = [
    "What is diabetes ?",
    "Doctor, I have a headache and fever, what should I do ?",
    "Is hypertension inherited ?",
    "What causes anemia ?",
    "How to prevent influenza ?",
]


def argmax_loop(model, tokenizer, question: str, kind: str, steps: int) -> str:
    """Greedy decoding without cache or padding: recompute the full sequence every step."""
    prompt = encode_prompts([question], tokenizer, kind)[0]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            if kind == "causal":
                logits = model(input_ids=torch.tensor([prompt + new])).logits[0, -1]
            else:
                dec = [model.config.decoder_start_token_id] + new
                logits = model(
                    input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec])
                ).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("fixture,kind", [("tiny_llama", "causal"), ("tiny_t5", "seq2seq")])
def test_batched_greedy_equals_argmax_loop(fixture: str, kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    model, tokenizer = load_model(path), load_tokenizer(path)
    settings = EvaluateSettings(max_new_tokens=6, batch_size=3)
    batched = generate_answers(model, tokenizer, QUESTIONS, kind, settings, progress=False)
    expected = [argmax_loop(model, tokenizer, q, kind, 6) for q in QUESTIONS]
    assert batched.texts == expected  # answers come back in question order, padding changes nothing
    assert all(0 <= n <= 6 for n in batched.new_tokens)
    assert batched.seconds > 0


def test_sampling_is_seeded(tiny_llama) -> None:
    model, tokenizer = load_model(tiny_llama), load_tokenizer(tiny_llama)

    def run(seed: int) -> list[str]:
        settings = EvaluateSettings(max_new_tokens=8, batch_size=2, do_sample=True, seed=seed)
        return generate_answers(model, tokenizer, QUESTIONS, "causal", settings, progress=False).texts

    assert run(1) == run(1)
    assert run(1) != run(2)
    settings = EvaluateSettings(max_new_tokens=8)
    greedy = generate_answers(model, tokenizer, QUESTIONS, "causal", settings, progress=False).texts
    assert run(1) != greedy


def test_prompts_keep_their_last_tokens(tiny_llama) -> None:
    tokenizer = load_tokenizer(tiny_llama)
    full = encode_prompts(["word " * 100], tokenizer, "causal")[0]
    cut = encode_prompts(["word " * 100], tokenizer, "causal", max_prompt_tokens=16)[0]
    assert len(cut) == 16 and cut == full[-16:]
