"""Prompts for both model kinds; the prompt is masked out of the loss; dynamic padding."""

from __future__ import annotations

import pytest
import torch

from medmerge.data import IGNORE_INDEX, build_prompt, encode_pair, pad_batch
from medmerge.models import load_tokenizer


@pytest.fixture(scope="module")
def causal_tok(tiny_llama):
    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def t5_tok(tiny_t5):
    return load_tokenizer(tiny_t5)


def test_causal_prompt_uses_the_chat_template(causal_tok):
    assert build_prompt("What is gout?", "causal", causal_tok) == (
        "<|im_start|>user\nWhat is gout?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_prompt("Q?", "causal", causal_tok, system="Be brief.").startswith(
        "<|im_start|>system\nBe brief."
    )


def test_seq2seq_prompt(t5_tok):
    assert build_prompt("What is gout?", "seq2seq", t5_tok) == "question: What is gout?"


def test_causal_labels_cover_exactly_the_answer_and_eos(causal_tok):
    example = encode_pair("What is gout?", "Gout is arthritis.", causal_tok, "causal")
    ids, labels = example["input_ids"], example["labels"]
    prompt_len = len(
        causal_tok(build_prompt("What is gout?", "causal", causal_tok), add_special_tokens=False)["input_ids"]
    )
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert causal_tok.decode(labels[prompt_len:-1]) == "Gout is arthritis."
    assert labels[-1] == causal_tok.eos_token_id


def test_seq2seq_labels_are_the_answer(t5_tok):
    example = encode_pair("What is gout?", "Gout is arthritis.", t5_tok, "seq2seq")
    assert t5_tok.decode(example["labels"], skip_special_tokens=True) == "Gout is arthritis."
    assert example["labels"][-1] == t5_tok.eos_token_id
    assert example["input_ids"][-1] == t5_tok.eos_token_id  # T5 encoder inputs end with </s>
    assert IGNORE_INDEX not in example["labels"]


def test_truncation_keeps_prompt_end_and_answer_start(causal_tok):
    example = encode_pair(
        "word " * 100, "long answer " * 100, causal_tok, "causal", max_prompt_tokens=10, max_answer_tokens=5
    )
    assert len(example["input_ids"]) == 15
    assert causal_tok.decode(example["input_ids"][:10]).endswith("<|im_start|>assistant\n")
    assert sum(label != IGNORE_INDEX for label in example["labels"]) == 5


def test_pad_batch_right_and_left():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = pad_batch(examples, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = pad_batch([{"input_ids": [5, 6]}, {"input_ids": [8]}], pad_token_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6], [0, 8]] and "labels" not in left
    assert left["input_ids"].dtype == torch.long
