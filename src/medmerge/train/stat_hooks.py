"""The hooks behind `medmerge stats` (medmerge.train.statistics): Gram sums and per-example Fisher.

GramHooks   forward pre-hooks: G += XᵀX of each Linear's non-padding input rows, a float32 matmul per
            batch added into a float64 sum (an example's rows optionally scaled by √s_i, s_i its clipping
            factor under DP). A Linear reading the very tensor another Linear read in this forward is
            recorded as that one's alias and not summed again.
FisherHooks forward hooks + output-gradient hooks: for a Linear y = x Wᵀ (+ b) the gradient of example i's
            loss is ∂ℓ_i/∂W = Σ_t δ_{i,t} x_{i,t}ᵀ, δ = ∂(Σ_i ℓ_i)/∂y at example i's positions (the
            examples of a batch do not interact: attention is masked per sequence, dropout is off).
            One backward pass of the batch's summed loss gives every δ; the per-example gradients are one
            batched matmul (B, out, T) @ (B, T, in) per Linear, and F += Σ_i (∂ℓ_i/∂W)². The weights
            need no gradient (autograd computes no weight gradient at all): the input embeddings' output
            is what requires one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from medmerge.data import IGNORE_INDEX, pad_batch
from medmerge.errors import MedmergeError


@dataclass
class Grams:
    """Gram sums (float64) by stored weight name, the aliases of shared inputs, and token counts."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # weight name → stored weight name
    tokens: dict[str, int] = field(default_factory=dict)  # "input" (causal) or "encoder" / "decoder"

    def float32(self) -> dict[str, torch.Tensor]:
        return {name: g.float() for name, g in self.sums.items()}


def gram_batch(batch: dict[str, torch.Tensor], seq2seq: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """Seq2seq: one more (masked) encoder column where encoder and decoder lengths are equal."""
    if seq2seq and batch["input_ids"].shape[1] == batch["labels"].shape[1]:
        column = torch.full_like(batch["input_ids"][:, :1], pad_id)
        batch["input_ids"] = torch.cat([batch["input_ids"], column], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros_like(column)], dim=1)
    return batch


def head_free(model: torch.nn.Module, modules: dict[str, torch.nn.Linear]) -> dict[str, int]:
    """{"logits_to_keep": 1} where the head needs no Gram and the forward takes it (no (B, T, V) logits)."""
    import inspect

    head = model.get_output_embeddings()
    if any(m is head for m in modules.values()):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def token_batches(
    examples: Sequence[Mapping[str, list[int]]],
    batch_size: int,
    seq2seq: bool,
    pad_id: int,
    device: torch.device,
):
    """Padded batches of `examples` sorted by length (less padding), their token masks by (B, T) shape,
    and the token counts they add ({"input": n} or {"encoder": n, "decoder": m})."""
    ordered = sorted(examples, key=lambda e: (len(e["input_ids"]), len(e["labels"])))
    for start in range(0, len(ordered), batch_size):
        batch = gram_batch(pad_batch(ordered[start : start + batch_size], pad_id), seq2seq, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = batch["attention_mask"].bool()  # (B, T)
        masks = {tuple(inputs.shape): inputs}
        counts = {"encoder" if seq2seq else "input": int(inputs.sum())}
        if seq2seq:
            answers = batch["labels"] != IGNORE_INDEX  # (B, T_dec): decoder positions that exist
            masks[tuple(answers.shape)] = answers
            counts["decoder"] = int(answers.sum())
        yield batch, masks, counts


def add_counts(grams: Grams, counts: dict[str, int]) -> None:
    for name, n in counts.items():
        grams.tokens[name] = grams.tokens.get(name, 0) + n


def new_grams(seq2seq: bool) -> Grams:
    return Grams(tokens={"encoder": 0, "decoder": 0} if seq2seq else {"input": 0})


class GramHooks:
    """Forward pre-hooks adding XᵀX of each Linear's non-padding input rows into float64 sums.

    Rows are picked with the mask of the token sequence the input belongs to, found by its (B, T) shape
    (the caller makes encoder and decoder lengths differ).
    """

    def __init__(self, modules: dict[str, torch.nn.Linear], grams: Grams) -> None:
        self.grams = grams
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}
        self.seen: list[tuple[torch.Tensor, str]] = []
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def pre(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            owner = next((stored for t, stored in self.seen if t is x), None)
            if owner is not None:
                if self.grams.aliases.setdefault(name, owner) != owner or name in self.grams.sums:
                    raise MedmergeError(f"{name}: its input is shared differently from batch to batch")
                return
            if name in self.grams.aliases:
                raise MedmergeError(f"{name}: its input is shared differently from batch to batch")
            mask = self.masks.get(tuple(x.shape[:-1]))
            if mask is None:
                raise MedmergeError(f"{name}: input of shape {tuple(x.shape)} matches no token sequence")
            self._add(name, x.detach(), mask)
            self.seen.append((x, name))

        return pre

    def _add(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        rows = x[mask].float()  # (N, in)
        self._accumulate(name, rows)

    def _accumulate(self, name: str, rows: torch.Tensor) -> None:
        gram = (rows.T @ rows).double()
        total = self.grams.sums.get(name)
        self.grams.sums[name] = gram if total is None else total.add_(gram)

    def new_batch(self, masks: dict[tuple[int, ...], torch.Tensor]) -> None:
        self.masks = masks
        self.seen.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class FisherHooks:
    """Per-example squared gradients of each Linear's weight, summed into float32 tensors (module doc)."""

    def __init__(self, model: torch.nn.Module, modules: dict[str, torch.nn.Linear]) -> None:
        self.sums = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in modules.items()}
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}
        self.embedded: list[torch.Tensor] = []
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, its masked float32 rows)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]
        self.handles.append(model.get_input_embeddings().register_forward_hook(self._embedded))

    def _embedded(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.requires_grad_() if not output.requires_grad else output
        self.embedded.append(output)
        return output

    def _hook(self, name: str):
        def forward(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if not output.requires_grad:
                return
            if x.dim() != 3:
                shape = tuple(x.shape)
                raise MedmergeError(f"{name}: input of shape {shape} (per-example Fisher needs (B, T, in))")
            rows = next((r for t, r in self.rows if t is x), None)  # q/k/v read one tensor
            if rows is None:
                mask = self.masks.get(tuple(x.shape[:-1]))
                rows = x.detach().float()
                if mask is not None:  # padding rows carry no gradient; zero them all the same
                    rows = rows * mask.unsqueeze(-1).to(rows.dtype)
                self.rows.append((x, rows))
            total = self.sums[name]

            def on_grad(delta: torch.Tensor) -> None:
                per_example = torch.bmm(delta.float().transpose(1, 2), rows)  # (B, out, in)
                total.add_(per_example.square_().sum(0))

            output.register_hook(on_grad)

        return forward

    def backward(self, loss: torch.Tensor) -> None:
        """One backward pass of the batch's summed loss, down to the input embeddings' output."""
        inputs, self.embedded = self.embedded, []
        try:
            torch.autograd.grad(loss, inputs, allow_unused=True)
        finally:
            self.rows.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ClippedGramHooks(GramHooks):
    """Gram pre-hooks that clip each unit's contribution to the released vector before summing (DP).

    During a forward each stored Linear's masked inputs X_i (example i's rows) are kept, with
    ‖G'_{i,m}‖_F² = ‖X'_i X'_iᵀ‖_F², X' = X / D_m the rows in the released coordinates (D_m the layout's
    public input scale, 1 where none; a (T, T) product per example). `finish_batch` then weighs module m
    by f_m² (medmerge.train.private_stats.module_factors), takes N_i = √(Σ_m f_m² ‖G'_{i,m}‖_F²),
    s_i = min(1, limit / N_i), and adds Σ_i s_i X_iᵀX_i: every example's share of the whole released
    vector (all modules together) is at most `limit`.
    """

    def __init__(
        self,
        modules: dict[str, torch.nn.Linear],
        grams: Grams,
        limit: float,
        input_scales: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(modules, grams)
        self.limit = limit
        self.input_scales = dict(input_scales or {})
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # stored name → (X masked, ‖G'_i‖²)
        self.scales: list[torch.Tensor] = []  # s_i of every example so far, batch by batch
        self.norms: list[torch.Tensor] = []  # N_i, the unclipped norms

    def _add(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        if x.dim() != 3:
            raise MedmergeError(f"{name}: input of shape {tuple(x.shape)} (clipping needs (B, T, in))")
        rows = x.float() * mask.unsqueeze(-1).float()  # (B, T, in), padding rows zero
        scale = self.input_scales.get(name)
        released = rows / scale.to(rows) if scale is not None else rows
        outer = torch.bmm(released, released.transpose(1, 2))  # (B, T, T)
        self.kept[name] = (rows, outer.double().square().sum(dim=(1, 2)))

    def finish_batch(self, factors: dict[str, float]) -> torch.Tensor:
        """Clip and add this batch (class doc); `factors`: f_m² by stored name. Returns s (B,)."""
        squared = sum(factors[name] * norms for name, (_, norms) in self.kept.items())
        scale = (self.limit / squared.sqrt().clamp(min=1e-300)).clamp(max=1.0)  # (B,)
        root = scale.sqrt().float().view(-1, 1, 1)
        for name, (rows, _) in self.kept.items():
            self._accumulate(name, (rows * root).reshape(-1, rows.shape[-1]))
        self.kept.clear()
        self.scales.append(scale)
        self.norms.append(squared.sqrt())
        return scale
