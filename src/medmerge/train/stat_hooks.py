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

from dataclasses import dataclass, field

import torch

from medmerge.errors import MedmergeError


@dataclass
class Grams:
    """Gram sums (float64) by stored weight name, the aliases of shared inputs, and token counts."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # weight name → stored weight name
    tokens: dict[str, int] = field(default_factory=dict)  # "input" (causal) or "encoder" / "decoder"

    def float32(self) -> dict[str, torch.Tensor]:
        return {name: g.float() for name, g in self.sums.items()}


class GramHooks:
    """Forward pre-hooks adding XᵀX of each Linear's non-padding input rows into float64 sums.

    Rows are picked with the mask of the token sequence the input belongs to, found by its (B, T) shape
    (the caller makes encoder and decoder lengths differ). `row_scale` (B,), where set, multiplies
    example i's rows by √s_i, so that example's XᵀX counts s_i times (DP clipping).
    """

    def __init__(self, modules: dict[str, torch.nn.Linear], grams: Grams) -> None:
        self.grams = grams
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}
        self.row_scale: torch.Tensor | None = None
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
            x_ = x.detach()
            if self.row_scale is not None:
                x_ = x_ * self.row_scale.to(x_.dtype).sqrt().view(-1, *([1] * (x_.dim() - 1)))
            rows = x_[mask].float()  # (N, in)
            gram = (rows.T @ rows).double()
            total = self.grams.sums.get(name)
            self.grams.sums[name] = gram if total is None else total.add_(gram)
            self.seen.append((x, name))

        return pre

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
            mask = self.masks.get(tuple(x.shape[:-1]))
            rows = x.detach().float()
            if mask is not None:  # padding rows carry no gradient; zero them all the same
                rows = rows * mask.unsqueeze(-1).to(rows.dtype)
            total = self.sums[name]

            def on_grad(delta: torch.Tensor) -> None:
                per_example = torch.bmm(delta.float().transpose(1, 2), rows)  # (B, out, in)
                total.add_(per_example.square_().sum(0))

            output.register_hook(on_grad)

        return forward

    def backward(self, loss: torch.Tensor) -> None:
        """One backward pass of the batch's summed loss, down to the input embeddings' output."""
        inputs, self.embedded = self.embedded, []
        torch.autograd.grad(loss, inputs, allow_unused=True)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
