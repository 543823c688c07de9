"""Teacher-forced answer loss: the one place where a model's loss on reference answers is computed.

Used by training (validation loss), evaluation (loss / perplexity) and merge search (the scorer).
Only answer tokens count (labels ≠ -100); the mean is per answer token, in nats.
"""

from __future__ import annotations

import math
import types
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


_CHUNK_BYTES = 24 << 20  # float32 logits per chunk: stays under glibc's largest mmap threshold (32 MiB)


class _AnswerHeadNLL(torch.autograd.Function):
    """nll_i = logsumexp(z_i) − z_i[y_i],  z_i = W h_i  (N rows; W (V, C) frozen), chunk by chunk.

    The gradient is formed in the forward pass, while each chunk's logits exist:
        ∂nll_i/∂h_i = (softmax(z_i) − onehot(y_i)) W      (N, C)
    and backward scales row i by the incoming g_i. Nothing of size (N, V) outlives its chunk, and the
    float32 log-softmax with its backward (and the (N, V) zero-filled gradient) is never built. Same
    numbers as cross_entropy(W h, y) in `dtype` matmuls with float32 softmax; W gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype):  # (N, C), (V, C), (N,)
        need_grad = ctx.needs_input_grad[0]
        w, h = weight.to(dtype), hidden.to(dtype)
        n, vocab = h.shape[0], w.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=h.device)  # (N,)
        grad = torch.empty(n, h.shape[1], dtype=torch.float32, device=h.device) if need_grad else None
        rows = max(1, _CHUNK_BYTES // (4 * vocab))
        with torch.autocast(device_type=h.device.type, enabled=False):
            for start in range(0, n, rows):
                y = labels[start : start + rows]  # (n_c,)
                logits = (h[start : start + rows] @ w.T).float()  # (n_c, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n_c,)
                nll[start : start + rows] = lse - logits.gather(1, y[:, None]).squeeze(1)
                if need_grad:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    probs[torch.arange(y.numel(), device=y.device), y] -= 1.0
                    grad[start : start + rows] = probs.to(dtype) @ w  # (n_c, C)
        ctx.save_for_backward(grad if need_grad else nll.new_empty(0))
        ctx.hidden_dtype = hidden.dtype
        return nll

    @staticmethod
    def backward(ctx, g):  # g (N,)
        (grad,) = ctx.saved_tensors
        return (g[:, None] * grad).to(ctx.hidden_dtype), None, None, None


def answer_head_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row NLL (N,) in nats of `labels` under logits hidden @ weight.T, without an (N, V) tensor.

    Matmuls run in autocast's dtype where autocast is on (as the head's Linear would), else in the
    inputs' promoted dtype. `weight` must not need a gradient (see `_AnswerHeadNLL`).
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return _AnswerHeadNLL.apply(hidden, weight, labels, dtype)


def unpin_forwards(model: torch.nn.Module) -> int:
    """Delete each `module.forward` instance attribute that is just the module's own class forward.

    transformers 4.57's output capturing (`output_hidden_states=True`) leaves every decoder layer with
    an instance attribute `forward` holding its own bound method: layer → __dict__ → bound method →
    layer, a reference cycle that keeps the layers' weights alive after the model is dropped, until
    Python's next full collection (evaluating 17 models of 135M in one process peaked at 9.5 GiB).
    Deleting the attribute restores the class lookup, the same method, and breaks the cycle.
    """
    count = 0
    for module in model.modules():
        bound = module.__dict__.get("forward")
        if (
            isinstance(bound, types.MethodType)
            and bound.__self__ is module
            and bound.__func__ is getattr(type(module), "forward", None)
        ):
            del module.__dict__["forward"]
            count += 1
    return count


def _fusable(head: torch.nn.Module) -> bool:
    """A bias-free nn.Linear head whose weight gets no gradient here (LoRA / QLoRA, or no_grad)."""
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    return not (head.weight.requires_grad and torch.is_grad_enabled())


def token_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (B, T') in nats, 0 where labels are -100, and the answer-token mask (B, T').

    Causal: logits (B, T, V) at t predict token t+1, so labels are shifted left by one (T' = T − 1).
    Only the N answer positions need logits, so where `answer_only_head` allows it the model returns
    its final hidden states H (B, T, C) and the head runs on the N selected rows only:
    nll = CE(head(H[:, :-1][mask]), labels[:, 1:][mask]) — the same numbers as full logits, without
    the (B, T, V) tensor and the head's FLOPs for prompt and padding positions; a frozen bias-free head
    goes through `answer_head_nll`, which never holds more than a chunk of the (N, V) logits.
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
            unpin_forwards(model)
            hidden = outputs.hidden_states[-1][:, :-1]  # (B, T', C), after the final norm
            if _fusable(head):
                picked = answer_head_nll(hidden[mask], head.weight, labels[mask])  # (N,)
            else:
                logits = head(hidden[mask])  # (N, V)
                picked = torch.nn.functional.cross_entropy(logits.float(), labels[mask], reduction="none")
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
