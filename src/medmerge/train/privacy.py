"""Differentially private experts: DP-SGD on the LoRA adapters, with Opacus 1.6's per-example gradients,
clipping, noise and accountant (`privacy:` in a training config; see docs/privacy.md).

One DP step t, on a site with n training pairs (q = batch_size / n, C = max_grad_norm, σ = noise):
    B_t  = {i : u_i < q},  u_i ~ U(0, 1) i.i.d.        Poisson sampling (expected |B_t| = batch_size)
    ℓ_i  = (1 / a_i) Σ_{answer tokens k of i} −log p(y_k | …)   per-example objective: mean NLL per
                                                                answer token of pair i (nats; a_i ≥ 1)
    g_i  = ∇ ℓ_i  over the trainable LoRA parameters only      (Opacus GradSampleModule hooks on the
                                                                lora_A / lora_B nn.Linear layers)
    ĝ_t  = (Σ_{i∈B_t} g_i · min(1, C / ‖g_i‖₂) + N(0, σ²C² I)) / batch_size     (Opacus DPOptimizer)
then AdamW with the loop's learning-rate schedule. The loop's token-weighted loss and its global
`max_grad_norm` do not apply: each pair's gradient is clipped on its own, so one pair moves ĝ_t by at
most C / batch_size whatever its length. A sampled batch larger than batch_size is processed in
physical chunks of batch_size and clipped-and-summed before one noisy update (Opacus's
BatchMemoryManager semantics), so no sampled pair is dropped.

ε: with target_epsilon, σ = Opacus `get_noise_multiplier(ε, δ, q, T)` for the run's T steps (so the
run ends with spent ε ≤ target); with noise_multiplier, σ is given. The accountant (PRV or RDP) records
(σ, q, steps) at every noisy update and gives the ε spent for δ (default 1/n). Its history is kept in the
loop state (so checkpoints restore it), and the final record goes to the manifest's `privacy` block and
the adapter's model card; `read_privacy(expert_dir)` reads it back.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medmerge.config import TrainConfig
from medmerge.data import pad_batch
from medmerge.errors import MedmergeError
from medmerge.extras import require
from medmerge.loss import token_nll
from medmerge.train.examples import answer_tokens, example_tokens
from medmerge.train.loop import Trainer
from medmerge.train.precision import autocast_context

OBJECTIVE = "mean NLL per answer token of each example (nats), summed over the batch / batch_size"


@dataclass(frozen=True)
class PrivacyRecord:
    """The (ε, δ)-DP guarantee of an expert's training pairs, as written to its manifest."""

    epsilon: float  # ε actually spent by the run's steps, for `delta`, under `accountant`
    delta: float
    accountant: str  # "prv" or "rdp" (Opacus)
    noise_multiplier: float  # σ: Gaussian noise std / max_grad_norm
    sample_rate: float  # q = expected batch size / train_examples (Poisson sampling)
    steps: int  # noisy updates done
    max_grad_norm: float  # per-example L2 clipping bound C
    train_examples: int  # n, the pairs protected
    expected_batch_size: int
    target_epsilon: float | None = None
    history: tuple[tuple[float, float, int], ...] = ()  # accountant history: (σ, q, steps) runs
    objective: str = OBJECTIVE
    mechanism: str = "DP-SGD on LoRA parameters (Opacus, Poisson sampling, per-example clipping)"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "history": [list(h) for h in self.history]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrivacyRecord:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["history"] = tuple(tuple(h) for h in fields.get("history", ()))
        return cls(**fields)


def read_privacy(expert_dir: str | Path) -> PrivacyRecord | None:
    """The DP record of an expert folder (manifest.json's `privacy` block), None if trained without DP.

    A merge of DP experts is DP at the largest ε of its inputs (post-processing, each site's data in
    one input); callers combine records that way.
    """
    path = Path(expert_dir) / "manifest.json"
    try:
        block = json.loads(path.read_text()).get("privacy")
    except (OSError, ValueError):
        raise MedmergeError(f"{path}: cannot read the expert's manifest") from None
    return PrivacyRecord.from_json(block) if block else None


def _opacus() -> Any:
    require("privacy (DP-SGD)", "opacus")
    import opacus

    return opacus


def spent_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε of the composed Poisson-subsampled Gaussian steps in `history` [(σ, q, steps)], for δ (Opacus)."""
    from opacus.accountants import create_accountant

    _opacus()
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """σ such that `steps` steps at rate q spend at most `target_epsilon` (Opacus get_noise_multiplier)."""
    _opacus()
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as exc:
        raise MedmergeError(f"privacy.target_epsilon: {target_epsilon} cannot be reached ({exc})") from None
    if spent_epsilon([(sigma, sample_rate, steps)], delta, accountant) > target_epsilon:
        raise MedmergeError(f"privacy.target_epsilon: {target_epsilon} cannot be reached in {steps} steps")
    return sigma


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


class PoissonStream:
    """Poisson-sampled batches: draw t keeps each index i with probability q, independently.

    u = torch.rand(n) from a generator seeded by (seed, t), B_t = {i : u_i < q} (Opacus's
    UniformWithReplacementSampler law). The draw counter is the whole state, so a resumed run draws the
    same batches; `epoch` and `index` count draws in units of 1/q (the expected draws per epoch).
    """

    def __init__(self, n: int, sample_rate: float, seed: int) -> None:
        self.n, self.sample_rate, self.seed = n, sample_rate, seed
        self.batches_per_epoch = max(1, round(1 / sample_rate))
        self.draws = 0

    @property
    def epoch(self) -> int:
        return self.draws // self.batches_per_epoch

    @property
    def index(self) -> int:
        return self.draws % self.batches_per_epoch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.draws = int(state["epoch"]) * self.batches_per_epoch + int(state["index"])

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.draws) ^ 0x9E3779B97F4A7C15)
        self.draws += 1
        return torch.nonzero(torch.rand(self.n, generator=gen) < self.sample_rate).flatten().tolist()


def example_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example objective ℓ (B,) = summed answer NLL / answer tokens (nats / token), and the sums (B,)."""
    nll, mask = token_nll(model, batch)  # (B, T'), (B, T')
    sums = nll.sum(dim=1)
    return sums / mask.sum(dim=1).clamp(min=1), sums


class PrivateTrainer(Trainer):
    """The loop with DP-SGD steps (see the module doc); everything else (validation, keep-best,
    checkpoints, schedule) is the Trainer's."""

    def __init__(self, config: TrainConfig, *args: Any, **kwargs: Any) -> None:
        """Trainer's arguments (config, model, kind, train, validation, pad_id, runtime, bf16)."""
        settings = config.privacy
        if settings is None:
            raise MedmergeError("privacy: PrivateTrainer needs a privacy section in the config")
        opacus = _opacus()
        super().__init__(config, *args, **kwargs)
        refuse_unsupported(config, self.runtime.world)
        model, n = self.model, len(self.train)
        self.settings = settings
        self.delta = settings.delta if settings.delta is not None else 1.0 / n
        self.sample_rate = config.batch_size / n
        self.stream = PoissonStream(n, self.sample_rate, config.seed)
        if not config.max_steps:
            self.total_steps = max(1, math.ceil(config.epochs / self.sample_rate))
        self.noise_multiplier = settings.noise_multiplier or noise_for_target(
            settings.target_epsilon, self.delta, self.sample_rate, self.total_steps, settings.accountant
        )
        from opacus.accountants import create_accountant

        self.grad_module = opacus.GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        self.accountant = create_accountant(mechanism=settings.accountant)
        self.dp_optimizer = opacus.optimizers.DPOptimizer(
            self.optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=config.batch_size,
            loss_reduction="mean",
        )
        self.dp_optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )
        self._record_privacy()

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.dp_optimizer.params

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
        )

    def _record_privacy(self, with_epsilon: bool = False) -> None:
        """Keep the accountant's history in the loop state (what checkpoints save)."""
        if with_epsilon:
            self.state.privacy = self.record().to_json()
        else:
            self.state.privacy = {"history": [list(h) for h in self.accountant.history]}

    def _float_grad_samples(self) -> None:
        """Per-example grads in float32 (bf16 autocast makes them bf16): clipping norms are then exact."""
        for p in self.params:
            gs = p.grad_sample
            if isinstance(gs, list):
                p.grad_sample = [g.float() for g in gs]
            elif gs is not None:
                p.grad_sample = gs.float()

    def step(self) -> tuple[float, int]:
        """One DP-SGD update over a Poisson batch: (train loss, nats / answer token; non-pad tokens)."""
        examples = [self.train[i] for i in next(self.stream)]
        examples.sort(key=lambda e: -len(e["input_ids"]) - len(e["labels"]))  # less padding per chunk
        n_answer = sum(answer_tokens(e, self.kind) for e in examples)
        tokens = sum(example_tokens(e, self.kind) for e in examples)
        size = self.config.batch_size
        chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
        if not chunks:  # an empty Poisson batch: the update is noise alone (and is accounted for)
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        nll_total = 0.0
        for i, chunk in enumerate(chunks):
            batch = {k: v.to(self.runtime.device) for k, v in pad_batch(chunk, self.pad_id).items()}
            with autocast_context(self.bf16, self.runtime.device):
                losses, sums = example_losses(self.model, batch)
            with (
                warnings.catch_warnings()
            ):  # Opacus's full backward hooks on LoRA A, whose input needs no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()
            nll_total += float(sums.detach().sum())
            self._float_grad_samples()
            if i < len(chunks) - 1:  # clip and accumulate this chunk; noise once, after the last one
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
        privacy record in `state.privacy`; the train-loss column (raw private data) is dropped."""
        saved = (self.state.privacy or {}).get("history")
        if saved:
            self.accountant.history = [tuple(h) for h in saved]
        try:
            state = super().run(save_checkpoint, progress=progress)
        finally:
            self.grad_module.remove_hooks()
        for row in state.curve:
            row.pop("train_loss", None)
        self._record_privacy(with_epsilon=True)
        return state


def privacy_card(folder: Path, record: dict[str, Any] | None) -> None:
    """Append the DP guarantee to the folder's model card (README.md) where one exists."""
    card = folder / "README.md"
    if not record or not card.is_file():
        return
    r = PrivacyRecord.from_json(record)
    text = (
        "\n## Differential privacy\n\n"
        f"Trained with DP-SGD: (ε = {r.epsilon:.4g}, δ = {r.delta:.3g})-differentially private with respect "
        f"to each of the {r.train_examples} training pairs ({r.accountant} accountant; σ = "
        f"{r.noise_multiplier:.4g}, q = {r.sample_rate:.4g}, {r.steps} steps, per-example clipping "
        f"C = {r.max_grad_norm:g}). The base model, the validation pairs and reported test metrics are "
        "not covered. Machine-readable: the `privacy` block of manifest.json.\n"
    )
    with open(card, "a") as f:
        f.write(text)
