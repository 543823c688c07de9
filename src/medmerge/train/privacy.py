"""Differentially private experts: DP-SGD on the LoRA adapters, with Opacus 1.6's per-example gradients,
clipping, noise and accountant (`privacy:` in a training config; see docs/privacy.md).

One DP step t, on a site with N units of privacy (pairs, or groups of pairs: medmerge.train.dp),
q = batch_size / N, C = max_grad_norm, σ = noise multiplier:
    U_t  = {u : r_u < q},  r_u ~ U(0, 1) i.i.d. from a SECRET generator   Poisson sampling of units
    ℓ_i  = (1 / a_i) Σ_{answer tokens k of i} −log p(y_k | …)   per-pair objective: mean NLL per
                                                                answer token of pair i (nats; a_i ≥ 1)
    g_u  = Σ_{i ∈ u} ∇ ℓ_i  over the trainable LoRA parameters   a unit's summed per-pair gradients
                                                                (Opacus GradSampleModule hooks)
    ĝ_t  = (Σ_{u∈U_t} g_u · min(1, C / ‖g_u‖₂) + N(0, σ²C² I)) / batch_size     (Opacus DPOptimizer,
                                                                secure_mode noise, SECRET generator)
then AdamW with the loop's learning-rate schedule. Adding or removing one unit moves the clipped sum by
at most C (its sensitivity), whatever the unit's size or its answers' lengths. A sampled batch with more
pairs than batch_size runs in physical chunks of batch_size pairs; each unit's per-pair gradients are
summed (across chunks where a unit spans several) before it is clipped, and the clipped sums of all
chunks before one noisy update, so no sampled pair is dropped.

ε: with target_epsilon, σ = Opacus `get_noise_multiplier(ε, δ, q, T)` for the run's T steps; with
noise_multiplier, σ is given. δ defaults to 1/(10·N). The accountant (PRV or RDP) records (σ, q, steps)
at every noisy update; its history is kept in the loop state (checkpoints restore it) and goes to the
manifest's `privacy` block, the model card, and the site's privacy ledger (medmerge.train.ledger).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from medmerge.config import TrainConfig
from medmerge.data import pad_batch
from medmerge.errors import MedmergeError
from medmerge.extras import require
from medmerge.loss import token_nll
from medmerge.train.dp import (
    REPORTED_DELTAS,
    PoissonStream,
    PrivacyRecord,
    PrivacyUnits,
    epsilons_at,
    noise_for_target,
    privacy_units,
    read_privacy,
    resolve_delta,
    secret_generator,
)
from medmerge.train.examples import answer_tokens, example_tokens
from medmerge.train.ledger import Release, spent_epsilon
from medmerge.train.loop import Trainer
from medmerge.train.precision import autocast_context

__all__ = [
    "PrivacyRecord",
    "PrivateTrainer",
    "example_losses",
    "privacy_card",
    "read_privacy",
    "refuse_unsupported",
    "spent_epsilon",
]


def _opacus() -> Any:
    require("privacy (DP-SGD)", "opacus")
    import opacus

    return opacus


def refuse_unsupported(config: TrainConfig, world: int) -> None:
    """Raise a one-line MedmergeError for each setting DP-SGD cannot honour (checked before training)."""
    if config.method == "full":
        raise MedmergeError(
            "privacy: method full is not supported (per-example gradients of every weight cost "
            "batch × model size); use method: lora"
        )
    if config.method != "lora":
        raise MedmergeError(
            f"privacy: method {config.method} is not supported (4-bit base); use method: lora"
        )
    if config.lora.use_dora:
        raise MedmergeError(
            "privacy: lora.use_dora is not supported (Opacus has no per-example gradient of DoRA's magnitude)"
        )
    targets = config.lora.target_modules
    if isinstance(targets, list) and any(t.split(".")[-1] == "lm_head" for t in targets):
        raise MedmergeError(
            "privacy: LoRA on lm_head is not supported (the fused answer head flattens token rows, so its "
            "per-example gradients would be per token); remove it from lora.target_modules"
        )
    if config.grad_accum != 1:
        raise MedmergeError(
            "privacy: grad_accum must be 1 (a Poisson-sampled batch is one DP step; raise batch_size instead)"
        )
    if world > 1:
        raise MedmergeError(
            "privacy: multi-process (torchrun / DDP) training is not supported; run one process"
        )
    if config.group_by_length and "group_by_length" in config.model_fields_set:
        raise MedmergeError(
            "privacy: group_by_length does not apply (Poisson sampling draws each batch); remove it"
        )


def example_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example objective ℓ (B,) = summed answer NLL / answer tokens (nats / token), and the sums (B,)."""
    nll, mask = token_nll(model, batch)  # (B, T'), (B, T')
    sums = nll.sum(dim=1)
    return sums / mask.sum(dim=1).clamp(min=1), sums


def _flat(grad_sample: Any) -> torch.Tensor:
    """A parameter's per-example gradients as one float32 tensor (B, *shape) (Opacus's flat view)."""
    if isinstance(grad_sample, list):
        grad_sample = torch.cat(grad_sample, dim=0)
    return grad_sample.float()


class PrivateTrainer(Trainer):
    """The loop with DP-SGD steps (see the module doc); everything else (validation, keep-best,
    checkpoints, schedule) is the Trainer's. `groups`: each training example's privacy group
    (medmerge.train.examples.TrainData.train_groups; None: no groups known, the unit is the pair)."""

    def __init__(
        self, config: TrainConfig, *args: Any, groups: list[str | None] | None = None, **kwargs: Any
    ) -> None:
        """Trainer's arguments (config, model, kind, train, validation, pad_id, runtime, bf16)."""
        settings = config.privacy
        if settings is None:
            raise MedmergeError("privacy: PrivateTrainer needs a privacy section in the config")
        opacus = _opacus()
        super().__init__(config, *args, **kwargs)
        refuse_unsupported(config, self.runtime.world)
        lm_head = [n for n, p in self.model.named_parameters() if p.requires_grad and "lm_head" in n]
        if lm_head:
            raise MedmergeError(
                f"privacy: LoRA on lm_head is not supported ({lm_head[0]}: the fused answer head's "
                "per-example gradients would be per token)"
            )
        self.settings = settings
        self.units: PrivacyUnits = privacy_units(settings, groups, len(self.train), config.data.specs)
        n = self.units.count
        self.delta = resolve_delta(settings.delta, n, self.units.kind)
        if config.batch_size >= n:
            raise MedmergeError(
                f"privacy: batch_size {config.batch_size} ≥ N = {n} {self.units.kind}s (sampling rate "
                "q = batch_size / N must be below 1)"
            )
        self.sample_rate = config.batch_size / n
        self.stream = PoissonStream(self.units, self.sample_rate)
        if not config.max_steps:
            self.total_steps = max(1, math.ceil(config.epochs / self.sample_rate))
        self.noise_multiplier = settings.noise_multiplier or noise_for_target(
            settings.target_epsilon, self.delta, self.sample_rate, self.total_steps, settings.accountant
        )
        from opacus.accountants import create_accountant

        self.grad_module = opacus.GradSampleModule(
            self.model, batch_first=True, loss_reduction="sum", strict=True
        )
        self.accountant = create_accountant(mechanism=settings.accountant)
        self.dp_optimizer = opacus.optimizers.DPOptimizer(
            self.optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=config.batch_size,
            loss_reduction="mean",
            generator=secret_generator(),
            secure_mode=True,
        )
        self.dp_optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )
        self._record_privacy()

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.dp_optimizer.params

    def planned_release(self, what: str = "expert") -> Release:
        """The release this run will make if it runs all its steps (for a ledger's pre-check)."""
        return self._release(what, [(self.noise_multiplier, self.sample_rate, self.total_steps)])

    def release(self, what: str = "expert") -> Release:
        """The release of the steps done so far (for the site's ledger)."""
        return self._release(what, [tuple(h) for h in self.accountant.history])

    def _release(self, what: str, history: list) -> Release:
        return Release(
            what=what,
            mechanism="DP-SGD on LoRA (Opacus: Poisson sampling of units, per-unit clipping, Gaussian noise)",
            unit=self.units.kind,
            unit_words=self.units.words,
            history=tuple((float(s), float(q), int(n)) for s, q, n in history),
        )

    def record(self) -> PrivacyRecord:
        """The guarantee of the steps done so far (ε from the accountant's history)."""
        s = self.settings
        history = [tuple(h) for h in self.accountant.history]
        return PrivacyRecord(
            epsilon=spent_epsilon(history, self.delta, s.accountant),
            delta=self.delta,
            accountant=s.accountant,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=sum(int(h[2]) for h in history),
            max_grad_norm=s.max_grad_norm,
            train_examples=len(self.train),
            expected_batch_size=self.config.batch_size,
            target_epsilon=s.target_epsilon,
            history=tuple(history),
            unit=self.units.kind,
            unit_words=self.units.words,
            train_units=self.units.count,
            epsilon_at=epsilons_at(history, s.accountant),
        )

    def _record_privacy(self, with_epsilon: bool = False) -> None:
        """Keep the accountant's history in the loop state (what checkpoints save)."""
        if with_epsilon:
            self.state.privacy = self.record().to_json()
        else:
            self.state.privacy = {"history": [list(h) for h in self.accountant.history]}

    def _sum_units(self, unit_of: list[int], carry: dict | None, continues: bool) -> dict | None:
        """Replace each parameter's per-pair gradients (k, *shape) by its per-unit sums (m, *shape).

        `unit_of[j]`: the unit of the chunk's pair j (units contiguous); `carry`: the partial sums of
        a unit that began in the previous chunk (added to this chunk's first unit); `continues`: the
        chunk's last unit goes on into the next chunk, so its partial sum is carried, not clipped yet.
        """
        runs = [0] + [j for j in range(1, len(unit_of)) if unit_of[j] != unit_of[j - 1]]
        local = torch.zeros(len(unit_of), dtype=torch.long)
        for position, start in enumerate(runs):
            local[start:] = position
        out: dict | None = {} if continues else None
        for p in self.params:
            gs = p.grad_sample
            pairs = _flat(gs) if gs is not None else p.new_zeros((len(unit_of), *p.shape))
            sums = pairs.new_zeros((len(runs), *pairs.shape[1:])).index_add_(0, local.to(pairs.device), pairs)
            if carry is not None:
                sums[0] += carry[p]
            if continues:
                out[p], sums = sums[-1].clone(), sums[:-1]
            p.grad_sample = sums
        return out

    def step(self) -> tuple[float, int]:
        """One DP-SGD update over a Poisson batch of units: (train loss, nats / answer token; non-pad
        tokens)."""
        units = next(self.stream)
        members = self.units.members
        units.sort(key=lambda u: -max(len(self.train[i]["input_ids"]) + len(self.train[i]["labels"])
                                       for i in members[u]))  # fmt: skip  # less padding per chunk
        flat = [(u, i) for u in units for i in members[u]]
        examples = [self.train[i] for _, i in flat]
        n_answer = sum(answer_tokens(e, self.kind) for e in examples)
        tokens = sum(example_tokens(e, self.kind) for e in examples)
        size = self.config.batch_size
        chunks = [flat[i : i + size] for i in range(0, len(flat), size)]
        if not chunks:  # an empty Poisson batch: the update is noise alone (and is accounted for)
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        nll_total, carry = 0.0, None
        for k, chunk in enumerate(chunks):
            batch = {
                key: v.to(self.runtime.device)
                for key, v in pad_batch([self.train[i] for _, i in chunk], self.pad_id).items()
            }
            with autocast_context(self.bf16, self.runtime.device):
                losses, sums = example_losses(self.model, batch)
            # Opacus's full backward hooks fire on LoRA A, whose input needs no grad: a harmless warning
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()
            nll_total += float(sums.detach().sum())
            last = k == len(chunks) - 1
            continues = not last and chunks[k + 1][0][0] == chunk[-1][0]
            carry = self._sum_units([u for u, _ in chunk], carry, continues)
            if not last:  # clip and accumulate this chunk's units; noise once, after the last one
                self.dp_optimizer.signal_skip_step(do_skip=True)
                self.dp_optimizer.step()
                self.dp_optimizer.zero_grad(set_to_none=True)
        self.dp_optimizer.step()
        self.scheduler.step()
        self.dp_optimizer.zero_grad(set_to_none=True)
        self._record_privacy()
        return nll_total / max(n_answer, 1), tokens

    def run(self, save_checkpoint: Any, progress: bool = True):
        """The Trainer's loop with the accountant restored from the loop state (resume) and the final
        privacy record in `state.privacy`. Nothing exact about the private batches stays in the curve:
        the train loss, the cumulative token count and the per-step time are dropped."""
        saved = (self.state.privacy or {}).get("history")
        if saved:
            self.accountant.history = [tuple(h) for h in saved]
        try:
            state = super().run(save_checkpoint, progress=progress)
        finally:
            self.grad_module.remove_hooks()
        for row in state.curve:
            for key in ("train_loss", "tokens", "elapsed_s"):
                row.pop(key, None)
        self._record_privacy(with_epsilon=True)
        return state


def privacy_card(folder: Path, record: dict[str, Any] | None) -> None:
    """Append the DP guarantee to the folder's model card (README.md) where one exists."""
    card = folder / "README.md"
    if not record or not card.is_file():
        return
    r = PrivacyRecord.from_json(record)
    units = f"{r.train_units} units" if r.train_units is not None else f"{r.train_examples} pairs"
    others = ", ".join(f"ε = {r.epsilon_at[f'{d:g}']:.3g} at δ = {d:g}" for d in REPORTED_DELTAS
                       if f"{d:g}" in r.epsilon_at)  # fmt: skip
    text = (
        "\n## Differential privacy\n\n"
        f"Trained with DP-SGD: (ε = {r.epsilon:.4g}, δ = {r.delta:.3g})-differentially private with respect "
        f"to **{r.unit_words}** (the unit of privacy: {units}, {r.train_examples} training pairs)"
        f"{'; ' + others if others else ''}. {r.accountant.upper()} accountant; "
        f"σ = {r.noise_multiplier:.4g}, q = {r.sample_rate:.4g}, {r.steps} steps, "
        f"per-unit clipping C = {r.max_grad_norm:g}.\n\n"
        "The sampling and the noise were drawn from a secret generator (seeded from os.urandom, never "
        "recorded), so this run cannot be reproduced bit for bit; `seed` set only the initialisation, the "
        "splits and dropout. Not covered: the base model, the validation pairs (validation loss), reported "
        "test metrics, the number of units N (it is in q), and anything released by the site besides this "
        "adapter (its privacy ledger composes those). Machine-readable: the `privacy` block of "
        "manifest.json.\n"
    )
    with open(card, "a") as f:
        f.write(text)
