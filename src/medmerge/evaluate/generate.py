"""Batched answer generation: greedy (or seeded sampling), KV cache, left padding for causal models.

Prompts are built with `medmerge.data.build_prompt` (the same text training and loss use), tokenized
without special tokens for causal models (the chat template carries them) and with them for seq2seq,
and cut to their last `max_prompt_tokens` tokens. Questions are generated in batches sorted by prompt
length (less padding), and the answers are returned in the order of the questions.

Causal batches are padded on the left, so every row's last prompt token sits at the same position and
the new tokens are appended after it; the attention mask hides the padding. Seq2seq encoder inputs are
padded on the right. Decoding uses the model's KV cache (`use_cache=True`): each new token costs one
forward pass over one position, not over the whole sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from medmerge.config import EvaluateSettings
from medmerge.data.prompts import build_prompt, pad_batch
from medmerge.errors import MedmergeError


@dataclass(frozen=True)
class Generations:
    """Answers in question order, with the new-token count of each and the wall time of the whole call."""

    texts: list[str]
    new_tokens: list[int]  # generated tokens per answer, eos excluded
    seconds: float  # wall time of generation (tokenization and decoding included)


def encode_prompts(
    questions: list[str], tokenizer: Any, kind: str, max_prompt_tokens: int = 256, system: str | None = None
) -> list[list[int]]:
    """Token ids of each question's prompt (generation header included), last `max_prompt_tokens` kept."""
    prompts = [build_prompt(q, kind, tokenizer, system) for q in questions]
    encoded = tokenizer(prompts, add_special_tokens=kind == "seq2seq")["input_ids"]
    return [ids[-max_prompt_tokens:] for ids in encoded]


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: list[str],
    kind: str,
    settings: EvaluateSettings | None = None,
    *,
    progress: bool = True,
) -> Generations:
    """Generate one answer per question with `settings`' max_new_tokens, batch_size, do_sample,
    temperature, top_p, seed, max_prompt_tokens and system (None: `EvaluateSettings()`'s); greedy unless
    `do_sample` (then seeded per batch: seed + b).

    Every setting is explicit (no model generation_config defaults leak in: no repetition penalty,
    no top-k), so the same call gives the same answers. Returns `Generations` in question order.
    """
    from transformers import GenerationConfig

    settings = settings if settings is not None else EvaluateSettings()
    max_new_tokens, batch_size, seed = settings.max_new_tokens, settings.batch_size, settings.seed
    do_sample, temperature, top_p = settings.do_sample, settings.temperature, settings.top_p
    if kind not in ("causal", "seq2seq"):
        raise MedmergeError(f"model kind {kind!r}: expected causal or seq2seq")
    if max_new_tokens < 1 or batch_size < 1:
        raise MedmergeError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}: expected ≥ 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=getattr(model.generation_config, "bos_token_id", None),
        **({"decoder_start_token_id": model.config.decoder_start_token_id} if kind == "seq2seq" else {}),
    )
    start = time.perf_counter()
    prompts = encode_prompts(questions, tokenizer, kind, settings.max_prompt_tokens, settings.system)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    texts: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        from tqdm import tqdm

        for b, rows in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress)):
            side = "left" if kind == "causal" else "right"
            batch = pad_batch([{"input_ids": prompts[i]} for i in rows], pad_id, side=side)
            batch = {k: v.to(device) for k, v in batch.items()}
            if do_sample:
                torch.manual_seed(seed + b)
            with torch.no_grad():
                out = model.generate(**batch, generation_config=config)  # (B, T_prompt + new) or (B, 1 + new)
            new = out[:, batch["input_ids"].shape[1] :] if kind == "causal" else out[:, 1:]  # (B, N)
            for row, ids in zip(rows, new.tolist(), strict=True):
                ids = _until_eos(ids, tokenizer.eos_token_id, pad_id)
                counts[row] = len(ids)
                texts[row] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return Generations(texts=texts, new_tokens=counts, seconds=time.perf_counter() - start)


def _until_eos(ids: list[int], eos_id: int | None, pad_id: int | None) -> list[int]:
    """The generated ids before the first eos (rows that finished early are padded after it)."""
    for t, token in enumerate(ids):
        if token == eos_id:
            return ids[:t]
    while ids and pad_id is not None and pad_id != eos_id and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids
