"""PubMedQA accuracy as the literature reports it: the likeliest of yes / no / maybe, given the abstract.

Protocol (that of lm-evaluation-harness's `pubmedqa` task, so the numbers compare with its `acc`):

    context     = "Abstract: {CONTEXTS joined by newlines}\\nQuestion: {QUESTION}\\nAnswer:"
    score(c)    = Σ log p(continuation tokens of " c" | context),   c ∈ (yes, no, maybe)
    prediction  = argmax_c score(c)   (first on ties);   accuracy = mean of [prediction == final_decision]

- The raw text, with no chat template and no system prompt, for every causal model (lm-eval's default,
  which applies a chat template only when asked), no special tokens added.
- Not length-normalized (lm-eval's `acc`, not `acc_norm`): each option's summed log-likelihood.
- Tokens as lm-eval splits them: the continuation is tok(context + " c") minus the tokens of tok(context)
  (for SmolLM2 " yes", " no" and " maybe" are one token each, so the three share one forward pass).
- Seq2seq models: the context is the encoder input (with the tokenizer's special tokens) and the option's
  tokens are the decoder labels.

The "test half" is PubMedQA's official 500-question test set (`test_ground_truth.json` of the PubMedQA
repository, and the test split of `bigbio/pubmed_qa` that lm-eval reads), rebuilt here offline by the
publisher's own `preprocess/split_dataset.py`: Python's `random.seed(0)`; the PMIDs of each label in file
order (yes, no, maybe) are shuffled and cut in two halves (the first ceil(n/2) go to cross-validation);
the second halves are the test set. On `ori_pqal.json` that gives 276 yes, 169 no and 55 maybe.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from medmerge.data import QAPair, pad_batch
from medmerge.loss import answer_loss_per_example, answer_only_head, unpin_forwards

PUBMEDQA_CHOICES = ("yes", "no", "maybe")
PUBMEDQA_TEMPLATE = "Abstract: {contexts}\nQuestion: {question}\nAnswer:"
TARGET_DELIMITER = " "  # lm-eval's default between context and option
PROTOCOL = (
    "PubMedQA accuracy: argmax over yes/no/maybe of the summed log-likelihood of ' option' after "
    "'Abstract: {CONTEXTS}\\nQuestion: {QUESTION}\\nAnswer:' (no chat template, not length-normalized; "
    "lm-evaluation-harness `pubmedqa` acc); accuracy_test: the official 500-question test half"
)
VERSION = 1  # bump when the protocol changes: invalidates cached scores


def has_choices(pairs: Sequence[QAPair]) -> bool:
    """Whether every pair carries a PubMedQA label and its abstract (the yes/no/maybe accuracy applies)."""
    return bool(pairs) and all(
        p.extra.get("final_decision") in PUBMEDQA_CHOICES and isinstance(p.extra.get("CONTEXTS"), list)
        for p in pairs
    )


def pubmedqa_context(pair: QAPair) -> str:
    """The text the options are scored after (lm-eval's `doc_to_text`): abstract, question, 'Answer:'."""
    contexts = "\n".join(str(c) for c in pair.extra["CONTEXTS"])
    return PUBMEDQA_TEMPLATE.format(contexts=contexts, question=pair.extra.get("QUESTION", pair.question))


def official_test_half(pairs: Sequence[QAPair]) -> set[str]:
    """Ids of PubMedQA's official 500-question test set among `pairs` (the whole PQA-L file, in file
    order), by the publisher's split script (module doc)."""
    rng = random.Random(0)
    by_label: dict[str, list[str]] = {c: [] for c in PUBMEDQA_CHOICES}
    for p in pairs:
        by_label[p.extra["final_decision"]].append(p.id)
    halves: list[list[str]] = [[], []]
    for ids in by_label.values():
        rng.shuffle(ids)
        size = math.ceil(len(ids) / 2)
        halves[0] += ids[:size]
        halves[1] += ids[size:]
    if len(halves[1]) != len(halves[0]):  # the script's rebalancing, for odd label counts
        picked = rng.choice(halves[0])
        halves[0].remove(picked)
        halves[1].append(picked)
    return set(halves[1])


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _causal_requests(
    contexts: Sequence[str], tokenizer: Any, choices: Sequence[str], max_length: int
) -> tuple[list[list[int]], list[tuple[int, int, list[int]]]]:
    """Unique input rows and, per (context, option) in order, (row, first scored position, tokens).

    lm-eval's split: continuation = tok(context + " option")[len(tok(context)):]. The row is
    context ‖ continuation[:-1], left-truncated to `max_length`; rows repeat across options whose
    continuation is one token, so each such context runs once.
    """
    rows: dict[tuple[int, ...], int] = {}
    requests = []
    for context in contexts:
        context_ids = _encode(tokenizer, context)
        for choice in choices:
            whole = _encode(tokenizer, context + TARGET_DELIMITER + choice)
            cont = whole[len(context_ids) :]
            row = (context_ids + cont[:-1])[-max_length:]
            start = len(row) - len(cont)  # logits at start + j predict cont[j]
            requests.append((rows.setdefault(tuple(row), len(rows)), start, cont))
    return [list(r) for r in rows], requests


@torch.no_grad()
def _causal_loglikelihoods(
    model: Any,
    rows: list[list[int]],
    requests: list[tuple[int, int, list[int]]],
    pad_id: int,
    batch_size: int,
) -> list[float]:
    """Σ log p of each request's tokens; the head runs on the scored positions only where exact."""
    wanted: dict[int, list[int]] = {}  # row -> positions whose log-probabilities are needed
    for row, start, cont in requests:
        wanted.setdefault(row, []).extend(range(start, start + len(cont)))
    logprobs: dict[tuple[int, int], torch.Tensor] = {}
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    head = answer_only_head(model)
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        batch = pad_batch([{"input_ids": rows[i]} for i in chunk], pad_id, side="right")
        batch = {k: v.to(device) for k, v in batch.items()}
        b_idx = [b for b, i in enumerate(chunk) for _ in sorted(set(wanted[i]))]
        t_idx = [t for i in chunk for t in sorted(set(wanted[i]))]
        if head is not None:
            out = model(**batch, output_hidden_states=True, logits_to_keep=1)
            unpin_forwards(model)
            logits = head(out.hidden_states[-1][b_idx, t_idx])  # (N, V)
        else:
            logits = model(**batch).logits[b_idx, t_idx]  # (N, V)
        scores = torch.log_softmax(logits.float(), dim=-1)
        for n, (b, t) in enumerate(zip(b_idx, t_idx, strict=True)):
            logprobs[(chunk[b], t)] = scores[n]
    return [
        float(sum(logprobs[(row, start + j)][tok] for j, tok in enumerate(cont)))
        for row, start, cont in requests
    ]


def _seq2seq_loglikelihoods(
    model: Any, contexts: Sequence[str], tokenizer: Any, choices: Sequence[str], batch_size: int
) -> list[float]:
    """Σ log p of each option's decoder tokens given the context as encoder input (the answer loss)."""
    examples = [
        {"input_ids": _encode(tokenizer, c, special=True), "labels": _encode(tokenizer, choice)}
        for c in contexts
        for choice in choices
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [pad_batch(examples[s : s + batch_size], pad_id) for s in range(0, len(examples), batch_size)]
    sums, _ = answer_loss_per_example(model, batches)
    return [-v for v in sums]


def choice_loglikelihoods(
    model: Any,
    tokenizer: Any,
    kind: str,
    contexts: Sequence[str],
    choices: Sequence[str] = PUBMEDQA_CHOICES,
    *,
    batch_size: int = 8,
) -> list[list[float]]:
    """Per context, the summed log-likelihood (nats) of each option after it (module doc)."""
    was_training = model.training
    model.eval()
    try:
        if kind == "seq2seq":
            flat = _seq2seq_loglikelihoods(model, contexts, tokenizer, choices, batch_size)
        else:
            limit = getattr(model.config, "max_position_embeddings", None) or 2048
            rows, requests = _causal_requests(contexts, tokenizer, choices, limit)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            flat = _causal_loglikelihoods(model, rows, requests, pad_id, batch_size)
    finally:
        model.train(was_training)
    k = len(choices)
    return [flat[i : i + k] for i in range(0, len(flat), k)]


def accuracy_per_item(
    loglikelihoods: Sequence[Sequence[float]],
    labels: Sequence[str],
    choices: Sequence[str] = PUBMEDQA_CHOICES,
) -> list[float]:
    """1.0 where the likeliest option (the first on ties, as numpy's argmax) is the label, else 0.0."""
    return [
        float(choices[max(range(len(ll)), key=lambda j: (ll[j], -j))] == label)
        for ll, label in zip(loglikelihoods, labels, strict=True)
    ]


def test_half_values(
    values: Sequence[float], pairs: Sequence[QAPair], whole: Sequence[QAPair]
) -> list[float]:
    """The `values` (one per pair) of the pairs in the official test half of `whole` (the file's pairs);
    empty where `whole` is not a labelled PubMedQA set."""
    if not has_choices(whole):
        return []
    half = official_test_half(whole)
    return [v for v, p in zip(values, pairs, strict=True) if p.id in half]
