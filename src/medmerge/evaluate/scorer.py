"""Teacher-forced answer loss over a question set: batches encoded once, and the merge-search scorer.

`validation_loss_scorer(...)` encodes the validation questions of some SPECs once and returns a function
model → mean answer NLL per token (nats; lower is better), computed by `medmerge.loss`. Greedy
soups and merge search call it on every candidate; all candidates must share the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from medmerge.data import QAPair, encode_pair, load_split, pad_batch
from medmerge.loss import answer_loss, answer_loss_per_example


def encode_loss_batches(
    pairs: Sequence[QAPair],
    tokenizer: Any,
    kind: str,
    *,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
    max_answer_tokens: int = 256,
    system: str | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Right-padded batches of (prompt ‖ answer) examples sorted by length, and `order`:
    batch row k (counting across batches) is pairs[order[k]]."""
    examples = [
        encode_pair(p.question, p.answer, tokenizer, kind, max_prompt_tokens, max_answer_tokens, system)
        for p in pairs
    ]
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]["input_ids"]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [
        pad_batch([examples[i] for i in order[s : s + batch_size]], pad_id, side="right")
        for s in range(0, len(order), batch_size)
    ]
    return batches, order


def per_question_loss(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], order: list[int]
) -> tuple[list[float], list[int]]:
    """Summed answer NLL (nats) and answer-token count per question, in the questions' original order."""
    sums, counts = answer_loss_per_example(model, batches)
    nll, tokens = [0.0] * len(order), [0] * len(order)
    for k, i in enumerate(order):
        nll[i], tokens[i] = sums[k], counts[k]
    return nll, tokens


def validation_loss_scorer(
    specs: Sequence[str],
    tokenizer: Any,
    kind: str,
    *,
    split: str = "validation",
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    max_examples: int | None = None,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
    max_answer_tokens: int = 256,
) -> Callable[[Any], float]:
    """A scorer model → mean answer NLL per token (nats, lower is better) over `split` of `specs`.

    The first `max_examples` pairs of each SPEC's split are encoded once; the score pools all answer
    tokens of all SPECs: Σ nll / Σ tokens.
    """
    pairs = [p for spec in specs for p in load_split(spec, split, seed, fractions, max_examples)]
    batches, _ = encode_loss_batches(
        pairs,
        tokenizer,
        kind,
        batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens,
        max_answer_tokens=max_answer_tokens,
    )

    def score(model: Any) -> float:
        return answer_loss(model, batches).mean

    return score
