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


def _hf_model(model: Any) -> Any:
    """The transformers model inside DDP / PEFT wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    get_base = getattr(model, "get_base_model", None)  # PeftModel
    return get_base() if callable(get_base) else model


def answer_only_head(model: Any) -> torch.nn.Module | None:
    """The output head to apply to answer positions only, or None where that is not exact.

    Exact for causal models whose forward computes `logits = lm_head(final hidden state)` with a
    `logits_to_keep` argument and no logit scaling or soft-capping (Llama, Mistral, Qwen2, Phi3, ...).
    """
    import inspect

    hf = _hf_model(model)
    config = hf.config
    if config.is_encoder_decoder or getattr(config, "final_logit_softcapping", None):
        return None
    if getattr(config, "logit_scale", None) not in (None, 1.0):
        return None
    if "logits_to_keep" not in inspect.signature(hf.forward).parameters:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if head is not None else hf.get_output_embeddings()


def token_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (B, T') in nats, 0 where labels are -100, and the answer-token mask (B, T').

    Causal: logits (B, T, V) at t predict token t+1, so labels are shifted left by one (T' = T − 1).
    Only the N answer positions need logits, so where `answer_only_head` allows it the model returns
    its final hidden states H (B, T, C) and the head runs on the N selected rows only:
    nll = CE(head(H[:, :-1][mask]), labels[:, 1:][mask]) — the same numbers as full logits, without
    the (B, T, V) tensor and the head's FLOPs for prompt and padding positions.
    Seq2seq: the model shifts labels right into decoder inputs itself; logits (B, T_dec, V) align.
    """
    labels = batch["labels"]
    if not model.config.is_encoder_decoder:
        labels = labels[:, 1:]  # (B, T')
        mask = labels != IGNORE_INDEX  # (B, T')
        head = answer_only_head(model)
        if head is not None:
            outputs = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
                logits_to_keep=1,
            )
            hidden = outputs.hidden_states[-1][:, :-1]  # (B, T', C), after the final norm
            logits = head(hidden[mask])  # (N, V)
            picked = torch.nn.functional.cross_entropy(logits.float(), labels[mask], reduction="none")  # (N,)
            nll = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device)
            return nll.masked_scatter(mask, picked), mask  # (B, T')
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        **({"labels": labels} if model.config.is_encoder_decoder else {}),
    )
    logits = outputs.logits  # (B, T, V)
    if not model.config.is_encoder_decoder:
        logits = logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)  # (B, T')
    return nll, labels != IGNORE_INDEX


def batch_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed NLL (a scalar tensor, with grad if enabled) and answer-token count of one padded batch."""
    nll, mask = token_nll(model, batch)
    return nll.sum(), int(mask.sum())


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


@torch.no_grad()
def answer_loss_per_example(
    model: Any, batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[list[float], list[int]]:
    """Per-example summed answer NLL (nats) and answer-token counts, in batch order.

    Σ nll / Σ tokens over the returned lists equals `answer_loss(model, batches).mean`; the per-example
    lists let evaluation bootstrap the loss over questions.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    try:
        for batch in batches:
            nll, mask = token_nll(model, {k: v.to(device) for k, v in batch.items()})
            sums.extend(nll.sum(dim=1).tolist())  # (B,)
            counts.extend(mask.sum(dim=1).tolist())  # (B,)
    finally:
        model.train(was_training)
    return sums, counts
