"""Clipped Gram statistics for `statistics: secure+dp` (the noise is added per release:
medmerge.merge.sum_noise).

What is released to the secure sum is, per stored Gram m (medmerge.merge.from_sums, site_contribution),
v_m = (w/d)·(pack(G_m), ΔW_k G_m, ΔW_k diag(G_m) for each weight k reading m's input), all modules
together, with G_m = Σ_units G_{i,m}. For one unit i:

    ‖v(G_i)‖² ≤ (w/d)² Σ_m f_m² ‖G_{i,m}‖_F²,   f_m² = 1 + (1 + [diagonal]) Σ_{k reads m} ‖ΔW_k‖₂²,

since ‖pack(G)‖ ≤ ‖G‖_F, ‖ΔW G‖_F ≤ ‖ΔW‖₂‖G‖_F and ‖ΔW diag(G)‖_F ≤ ‖ΔW‖₂‖G‖_F. Each unit's G_{i,m}
(all m at once) is scaled by s_i = min(1, C / N_i), N_i = √(Σ_m f_m² ‖G_{i,m}‖_F²), so adding or removing
one unit moves the whole released vector by at most (|w|/d)·C: the Gaussian mechanism's sensitivity.

The unit:
- "pair": one question–answer pair; each pair clipped at C.
- "group": one privacy group (a MedQuAD focus, a `group` column: medmerge.train.examples' train_groups);
  at most `per_group` pairs of a group are read, each clipped at C / per_group, so a group moves the
  vector by at most C.
Which units are read: each unit independently, with probability `rate`, decided by a keyed hash of the
unit (its group id, or the pair's token ids) under a key drawn from os.urandom and never written; so
adding a unit changes no other unit's inclusion. The ledger is charged without subsampling amplification
(sample rate 1), because the same sample serves every release: T releases at noise σ are one Gaussian
release at σ/√T, which is what the accountant composes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from medmerge.errors import MedmergeError
from medmerge.train import stat_hooks
from medmerge.train.stat_hooks import ClippedGramHooks, Grams

Unit = Literal["pair", "group"]


@dataclass(frozen=True)
class ClipSettings:
    """C (the bound on one unit's share of the whole released vector), the unit, and which units."""

    clip: float
    unit: Unit = "pair"
    per_group: int = 4
    rate: float = 1.0
    diagonal: bool = True  # the release holds ΔW·diag(G) too (α < 1 searchable)

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise MedmergeError(f"privacy clip: {self.clip} (expected C > 0)")
        if self.unit not in ("pair", "group"):
            raise MedmergeError(f"privacy unit: {self.unit!r} (expected 'pair' or 'group')")
        if self.per_group < 1 or not 0 < self.rate <= 1:
            raise MedmergeError(
                f"per_group {self.per_group}, rate {self.rate} (expected ≥ 1 and 0 < rate ≤ 1)"
            )

    @property
    def example_limit(self) -> float:
        """The clip of one pair: C, or C / per_group under the group unit."""
        return self.clip / (self.per_group if self.unit == "group" else 1)


def _unit_key(example: Mapping[str, list[int]], group: str | None, unit: Unit) -> bytes:
    if unit == "group":
        if group is None:
            raise MedmergeError("privacy unit 'group': a training pair has no group (the loader knows none)")
        return b"g:" + group.encode()
    ids = list(example["input_ids"]) + [-1] + list(example.get("labels", []))
    return b"p:" + b",".join(str(i).encode() for i in ids)


def unit_sample(
    examples: Sequence[Mapping[str, list[int]]],
    groups: Sequence[str | None] | None,
    settings: ClipSettings,
    key: bytes | None = None,
) -> list[int]:
    """Indices of the examples read: each unit kept with probability `rate` by HMAC-SHA256(key, unit)
    (key: os.urandom(32) unless given, e.g. by a test), at most `per_group` pairs per group (the pairs of
    a group ordered by their own hash, so the choice does not depend on other groups)."""
    key = key if key is not None else os.urandom(32)
    groups = list(groups) if groups is not None else [None] * len(examples)
    if len(groups) != len(examples):
        raise MedmergeError(f"privacy groups: {len(groups)} for {len(examples)} training pairs")

    def draw(unit: bytes) -> float:
        return int.from_bytes(hmac.new(key, unit, hashlib.sha256).digest()[:8], "big") / 2.0**64

    picked: list[int] = []
    by_group: dict[str, list[tuple[bytes, int]]] = {}
    for i, (example, group) in enumerate(zip(examples, groups, strict=True)):
        unit = _unit_key(example, group, settings.unit)
        if settings.unit == "pair":
            if draw(unit) < settings.rate:
                picked.append(i)
        else:
            by_group.setdefault(unit.decode(), []).append((_unit_key(example, None, "pair"), i))
    for group, members in by_group.items():
        if draw(group.encode()) < settings.rate:
            ranked = sorted(members, key=lambda m: hmac.new(key, m[0], hashlib.sha256).digest())
            picked.extend(i for _, i in ranked[: settings.per_group])
    return sorted(picked)


def spectral_norms(
    deltas: Mapping[str, torch.Tensor], input_scales: Mapping[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """‖ΔW·D‖₂ (the largest singular value) of each 2-D delta, D its input's public scale (1: none):
    the bound on ‖ΔW·G·D⁻¹‖_F / ‖D⁻¹GD⁻¹‖_F, since ΔW·G·D⁻¹ = (ΔW·D)(D⁻¹GD⁻¹)."""
    scales = input_scales or {}
    out = {}
    for name, d in deltas.items():
        if d.dim() != 2:
            continue
        scale = scales.get(name)
        matrix = d.double() * scale.double() if scale is not None else d.double()
        out[name] = float(torch.linalg.matrix_norm(matrix, ord=2))
    return out


def module_factors(
    stored: Sequence[str], aliases: Mapping[str, str], spectral: Mapping[str, float], diagonal: bool
) -> dict[str, float]:
    """f_m² = 1 + (1 + [diagonal]) Σ_{k reads m} ‖ΔW_k‖₂² for every stored Gram m (module doc)."""
    terms = 2.0 if diagonal else 1.0
    factors = {}
    for m in stored:
        readers = [m] + [k for k, target in aliases.items() if target == m]
        factors[m] = 1.0 + terms * sum(spectral.get(k, 0.0) ** 2 for k in readers)
    return factors


@torch.inference_mode()
def collect_clipped_grams(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Linear],
    examples: Sequence[Mapping[str, list[int]]],
    pad_id: int,
    spectral: Mapping[str, float],
    settings: ClipSettings,
    batch_size: int = 8,
    progress: bool = False,
    input_scales: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Grams, torch.Tensor, torch.Tensor]:
    """Σ_i s_i G_{i,m} over `examples` for every stored m (module doc), causal models; every s_i and
    every unclipped N_i (in batch order: examples sorted by length). `input_scales` (by weight name: the
    layout's public D of that weight's input) and `spectral` (spectral_norms(deltas, input_scales)) must
    be those the release uses."""
    if model.config.is_encoder_decoder:
        raise MedmergeError("clipped (DP) statistics: causal models only")
    grams = stat_hooks.new_grams(False)
    hooks = ClippedGramHooks(modules, grams, settings.example_limit, input_scales)
    keep = stat_hooks.head_free(model, modules)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total = -(-len(examples) // batch_size)
        batches = stat_hooks.token_batches(examples, batch_size, False, pad_id, device)
        for batch, masks, counts in tqdm(batches, total=total, desc="gram (clipped)", disable=not progress):
            hooks.new_batch(masks)
            stat_hooks.add_counts(grams, counts)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **keep)
            factors = module_factors(list(hooks.kept), grams.aliases, spectral, settings.diagonal)
            hooks.finish_batch(factors)
    finally:
        hooks.remove()
        model.train(was_training)
    empty = torch.zeros(0, dtype=torch.float64)
    scales = torch.cat(hooks.scales) if hooks.scales else empty
    return grams, scales, torch.cat(hooks.norms) if hooks.norms else empty
