"""Teacher-forced answer loss: the one place where a model's loss on reference answers is computed.

Used by training (validation loss), evaluation (loss / perplexity) and merge search (the scorer).
Only answer tokens count (labels ≠ -100); the mean is per answer token, in nats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from medmerge.data.prompts import IGNORE_INDEX


@dataclass(frozen=True)
class AnswerLoss:
    nll_sum: float  # Σ −log p(answer token | prompt, previous answer tokens), nats
    tokens: int  # answer tokens counted

    @property
    def mean(self) -> float:
        """Mean NLL per answer token (nats); the validation loss."""
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


def batch_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed NLL (a scalar tensor, with grad if enabled) and answer-token count of one padded batch.

    Causal: logits (B, T, V) at t predict token t+1, so labels are shifted left by one.
    Seq2seq: the model shifts labels right into decoder inputs itself; logits (B, T_dec, V) align.
    """
    labels = batch["labels"]
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        **({"labels": labels} if model.config.is_encoder_decoder else {}),
    )
    logits = outputs.logits  # (B, T, V)
    if not model.config.is_encoder_decoder:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def answer_loss(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> AnswerLoss:
    """Answer NLL summed over `batches` (padded with `medmerge.data.pad_batch`), model in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            nll, n = batch_nll(model, {k: v.to(device) for k, v in batch.items()})
            total += float(nll)
            tokens += n
    finally:
        model.train(was_training)
    return AnswerLoss(nll_sum=total, tokens=tokens)
