"""The parts of DP-SGD that its guarantee rests on: secret randomness, the unit of privacy, Poisson
sampling of units, δ, σ for a target ε, and the record an expert carries (medmerge.train.privacy runs
them in the training loop).

Secret randomness. DP's adversary may know every record but one and the whole training code; the
guarantee then rests on the randomness it cannot replay: which units each batch samples and the noise.
Both are drawn from torch generators seeded with 64 bits of `os.urandom`, which are never written
(not to the manifest, the checkpoints, the logs): `secret_generator()`. torch's generator is a Mersenne
Twister, not a cryptographic generator, so the guarantee rests on the secrecy of that seed (an
adversary who could try all 2⁶⁴ seeds, each a full replay of the training, could undo it). Opacus's
`secure_mode` noise (a sum of four Gaussians, against floating-point attacks on the noise's low bits)
is on. `seed` keeps its meaning for everything else: initialisation, splits, dropout masks. A DP run
is therefore not bit-reproducible, and a resumed DP run continues with fresh secret randomness (its
accountant history carries over).

Unit. With unit `pair` each Q&A pair is a unit; with `group` each group of pairs (a MedQuAD focus topic
with all its questions; a `group` column's value with all its rows; a pair without a group stays a
unit of its own). N counts units. Neighbouring datasets differ by one whole unit (add/remove), so a
unit's contribution to each step, its SUMMED gradient over its pairs, is clipped to C.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from medmerge.config.privacy import PrivacySettings
from medmerge.data import parse_spec
from medmerge.errors import MedmergeError
from medmerge.extras import require
from medmerge.train.ledger import UNIT_WORDS, spent_epsilon

OBJECTIVE = (
    "mean NLL per answer token of each pair (nats), summed over a unit's pairs, clipped per unit, "
    "summed over the batch / expected units per batch"
)
RANDOMNESS = (
    "Poisson sampling and Gaussian noise drawn from generators seeded by os.urandom (never recorded; "
    "Opacus secure_mode noise); the run is not bit-reproducible. `seed` sets initialisation, splits and "
    "dropout only."
)
REPORTED_DELTAS = (1e-5, 1e-6)  # ε is also printed at these δ


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 secret bits from os.urandom; the seed is not kept anywhere."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return gen


def gaussian_noise(like: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std²) noise shaped like `like`, as Opacus's secure_mode draws it: one draw thrown away,
    then (Σ of four N(0, std²) draws) / 2, which is N(0, std²) with its low-order bits smoothed
    (against floating-point attacks on the Gaussian's representation). `generator`: a secret one."""
    torch.normal(0.0, std, like.shape, generator=generator, device=like.device, dtype=like.dtype)
    total = torch.zeros_like(like)
    for _ in range(4):
        total += torch.normal(0.0, std, like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return total / 2


@dataclass(frozen=True)
class PrivacyUnits:
    """The units of privacy of a training set: `members[u]` are the example indices of unit u."""

    kind: Literal["pair", "group"]
    members: list[list[int]]
    words: str  # the unit in words, for the card and the manifest

    @property
    def count(self) -> int:
        return len(self.members)


def unit_words(kind: str, specs: list[str], some_without_group: bool) -> str:
    """The unit in words: "one MedQuAD focus topic and all its questions", "one question–answer pair"."""
    if kind == "pair":
        return UNIT_WORDS["pair"]
    words = []
    for spec in specs:
        parsed = parse_spec(spec)
        if parsed.kind == "medquad":
            words.append("one MedQuAD focus topic and all its questions")
        elif parsed.kind in ("jsonl", "csv"):
            column = parsed.options.get("group", "group")
            words.append(f"one value of the `{column}` column and all its rows")
    text = " / ".join(dict.fromkeys(words)) or "one group of pairs"
    return text + ("; a pair without a group is a unit of its own" if some_without_group else "")


def privacy_units(
    settings: PrivacySettings, groups: list[str | None] | None, n: int, specs: list[str]
) -> PrivacyUnits:
    """The units of `n` training examples whose privacy groups are `groups` (None: none known).

    `auto`: group where any example has a group, else pair. `group` with no group known is refused.
    """
    known = groups is not None and any(g is not None for g in groups)
    kind = settings.unit if settings.unit != "auto" else ("group" if known else "pair")
    if kind == "pair" or groups is None:
        if kind == "group":
            raise MedmergeError(
                "privacy.unit: group, but the training data has no groups (MedQuAD's focus or a jsonl/csv "
                "`group` column); use unit: pair or add the column"
            )
        return PrivacyUnits("pair", [[i] for i in range(n)], unit_words("pair", specs, False))
    if not known:
        raise MedmergeError(
            "privacy.unit: group, but the training data has no groups (MedQuAD's focus or a jsonl/csv "
            "`group` column); use unit: pair or add the column"
        )
    index: dict[str, list[int]] = {}
    members: list[list[int]] = []
    for i, group in enumerate(groups):
        if group is None:
            members.append([i])
        elif group in index:
            index[group].append(i)
        else:
            index[group] = [i]
            members.append(index[group])
    return PrivacyUnits("group", members, unit_words("group", specs, any(g is None for g in groups)))


def resolve_delta(delta: float | None, units: int, unit: str) -> float:
    """δ: the given one, or 1/(10·N); δ ≥ 1/N (a mechanism that may publish a whole unit) is refused."""
    if delta is None:
        return 1.0 / (10 * units)
    if delta >= 1.0 / units:
        raise MedmergeError(
            f"privacy.delta: {delta:g} ≥ 1/N = {1.0 / units:.3g} (N = {units} {unit}s) lets a run publish a "
            f"whole {unit}; choose δ < 1/N (default 1/(10·N) = {1.0 / (10 * units):.3g})"
        )
    return delta


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """σ such that `steps` steps at rate q spend at most `target_epsilon` (Opacus get_noise_multiplier)."""
    require("privacy (DP-SGD)", "opacus")
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


class PoissonStream:
    """Poisson-sampled batches of units: each draw keeps each unit independently with probability q.

    u = torch.rand(N, generator=secret), B_t = {u : u_u < q} (Opacus's UniformWithReplacementSampler
    law), then the batch is the examples of the sampled units. The generator is secret (module doc), so
    the draws are not replayable; only the draw counter is state (`epoch`, `index` count draws in units
    of 1/q, the expected draws per epoch), which a checkpoint keeps so the schedule resumes.
    """

    def __init__(self, units: PrivacyUnits, sample_rate: float) -> None:
        self.units, self.sample_rate = units, sample_rate
        self.batches_per_epoch = max(1, round(1 / sample_rate))
        self.draws = 0
        self.generator = secret_generator()

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
        """The sampled units (indices into `units.members`)."""
        self.draws += 1
        keep = torch.rand(self.units.count, generator=self.generator) < self.sample_rate
        return torch.nonzero(keep).flatten().tolist()


@dataclass(frozen=True)
class PrivacyRecord:
    """The (ε, δ)-DP guarantee of an expert's training units, as written to its manifest."""

    epsilon: float  # ε actually spent by the run's steps, for `delta`, under `accountant`
    delta: float
    accountant: str  # "prv" or "rdp" (Opacus)
    noise_multiplier: float  # σ: Gaussian noise std / max_grad_norm
    sample_rate: float  # q = expected units per batch / train_units (Poisson sampling)
    steps: int  # noisy updates done
    max_grad_norm: float  # per-unit L2 clipping bound C
    train_examples: int  # training pairs
    expected_batch_size: int  # expected units per batch
    target_epsilon: float | None = None
    history: tuple[tuple[float, float, int], ...] = ()  # accountant history: (σ, q, steps) runs
    objective: str = OBJECTIVE
    mechanism: str = "DP-SGD on LoRA parameters (Opacus, Poisson sampling of units, per-unit clipping)"
    unit: str = "pair"  # "pair" or "group"
    unit_words: str = UNIT_WORDS["pair"]
    train_units: int | None = None  # N, the units protected (None in records older than units)
    epsilon_at: dict[str, float] = field(default_factory=dict)  # ε at REPORTED_DELTAS, keyed "1e-05"
    randomness: str = RANDOMNESS

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "history": [list(h) for h in self.history]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrivacyRecord:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["history"] = tuple(tuple(h) for h in fields.get("history", ()))
        return cls(**fields)


def epsilons_at(history: list[tuple[float, float, int]], accountant: str) -> dict[str, float]:
    """ε of `history` at each of REPORTED_DELTAS (keys as `f"{δ:g}"`)."""
    return {f"{d:g}": spent_epsilon(history, d, accountant) for d in REPORTED_DELTAS}


def read_privacy(expert_dir: str | Path) -> PrivacyRecord | None:
    """The DP record of an expert folder (manifest.json's `privacy` block), None if trained without DP.

    What a merge of DP experts guarantees is computed by medmerge.evaluate.privacy.
    """
    path = Path(expert_dir) / "manifest.json"
    try:
        block = json.loads(path.read_text()).get("privacy")
    except (OSError, ValueError):
        raise MedmergeError(f"{path}: cannot read the expert's manifest") from None
    return PrivacyRecord.from_json(block) if block else None


def round_significant(value: float, digits: int = 2) -> float:
    """`value` to `digits` significant figures (how throughput is published beside a DP expert)."""
    if not value or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))
