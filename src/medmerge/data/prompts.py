"""Prompts for both model kinds, tokenization that masks the prompt out of the loss, and padding.

Causal instruction models (SmolLM2) get their chat template: system? + user question + assistant header,
and the answer follows, closed by the eos token. Seq2seq models (T5) get `question: …` as the encoder
input and the answer as decoder labels. Labels are -100 wherever the loss must not look (the prompt,
padding), which is the ignore_index of torch's cross-entropy.
"""

from __future__ import annotations

from typing import Any

from medmerge.models import ModelKind

IGNORE_INDEX = -100
PLAIN_CAUSAL_TEMPLATE = "Question: {question}\nAnswer: "
SEQ2SEQ_TEMPLATE = "question: {question}"


def build_prompt(question: str, kind: ModelKind, tokenizer: Any, system: str | None = None) -> str:
    """The text a model sees before its answer (no answer, generation prompt included)."""
    if kind == "seq2seq":
        return SEQ2SEQ_TEMPLATE.format(question=question)
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_CAUSAL_TEMPLATE.format(question=question)


def encode_pair(
    question: str,
    answer: str,
    tokenizer: Any,
    kind: ModelKind,
    max_prompt_tokens: int = 256,
    max_answer_tokens: int = 256,
    system: str | None = None,
) -> dict[str, list[int]]:
    """Token ids of one training/eval example, prompt masked out of `labels`.

    causal:  input_ids = prompt ‖ answer ‖ eos,  labels = [-100]*len(prompt) ‖ answer ‖ eos
    seq2seq: input_ids = prompt (encoder),       labels = answer ‖ eos (decoder)
    Prompts longer than `max_prompt_tokens` keep their last tokens (the generation header survives);
    answers longer than `max_answer_tokens` (eos included) are cut at the end.
    """
    prompt = build_prompt(question, kind, tokenizer, system)
    prompt_ids = tokenizer(prompt, add_special_tokens=kind == "seq2seq")["input_ids"][-max_prompt_tokens:]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_answer_tokens - 1]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    if kind == "seq2seq":
        return {"input_ids": prompt_ids, "labels": answer_ids}
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def pad_batch(examples: list[dict[str, list[int]]], pad_token_id: int, side: str = "right") -> dict[str, Any]:
    """Pad a list of encoded examples to the longest in the batch (dynamic padding), as tensors.

    Returns input_ids (B, T), attention_mask (B, T) and labels (B, T) or (B, T_dec) for seq2seq,
    labels padded with -100. `side="left"` pads prompts on the left, as batched generation needs.
    """
    import torch

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        padded = [
            (r + [value] * (width - len(r))) if side == "right" else ([value] * (width - len(r)) + r)
            for r in rows
        ]
        return torch.tensor(padded, dtype=torch.long)

    ids = [e["input_ids"] for e in examples]
    batch = {
        "input_ids": pad(ids, pad_token_id),
        "attention_mask": pad([[1] * len(r) for r in ids], 0),
    }
    if all("labels" in e for e in examples):
        batch["labels"] = pad([e["labels"] for e in examples], IGNORE_INDEX)
    return batch
