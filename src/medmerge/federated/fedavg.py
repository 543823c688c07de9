"""Multi-round FedAvg of LoRA — the baseline beside one-shot merging — with exact aggregation, and robust
options against a dishonest site.

FlowerTune / OpenFedLLM average A and B separately, which is not the average of the updates:
(Σ w_i B_i)(Σ w_i A_i) ≠ Σ w_i B_i A_i. Here each round every site trains a fresh rank-r LoRA for
`local_steps` on the current global model; the coordinator averages the updates themselves,
ΔW = Σ_i w_i s_i B_i A_i / Σ_i w_i, and re-factors ΔW by SVD at rank Σ_i r_i, where the truncation drops
nothing (rank ΔW ≤ Σ r_i): the default aggregate is exact to float rounding. Every party adds ΔW to its
copy of the global weights, and the next round trains a new LoRA on top (as FLoRA, Wang et al. 2024,
stacking; not FFA-LoRA, which needs A frozen in the training loop). On the wire per round: down, the
aggregate (Σ r_i factors per module, i.e. K adapters' worth); up, one rank-r adapter per site.

Robust options (AggregateOptions), on the updates ΔW_i themselves:
  weights   the w_i: "pairs" as each site reports them; "capped" (default): min(pairs_i, K × reference),
            the reference being the median of the sites' pairs (the other site's with 2 sites), so a
            site claiming 10⁹ pairs weighs at most K × a typical site; "uniform": w_i = 1.
  clip_norm C: each site's whole update scaled by min(1, C / ‖ΔW_i‖), ‖ΔW_i‖² = Σ_modules ‖ΔW_im‖_F²
            (Flower's fixed clipping, flwr DifferentialPrivacyServerSideFixedClipping's
            compute_clip_model_update; no noise is added here).
  rule      "mean" (the weighted mean above); "median": the coordinate-wise median of the ΔW_i
            (Flower's FedMedian: numpy's median, the mean of the two middle values for an even count;
            unweighted); "trimmed_mean": per coordinate, sort the n values, drop ⌊trim·n⌋ from each end and
            average the rest (Flower's FedTrimmedAvg, `proportiontocut` = trim ∈ [0, 0.5); unweighted).
            A site that does not adapt a module counts as ΔW = 0 there. Median and trimmed mean are full
            rank in general: their re-factoring at rank Σ r_i is a truncation, reported as max_svd_error.

    aggregate.safetensors   {"<weight>.A": (k, in), "<weight>.B": (out, k)}: ΔW = B·A in the weight's
                            own orientation, scale 1
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from medmerge.errors import MedmergeError
from medmerge.federated.checks import CheckedAdapter, LoraFactors, LoraStudy, validate_adapter

AGGREGATE = "aggregate.safetensors"
K_WEIGHT = 4.0  # "capped" weights: a site's pairs count at most K_WEIGHT × the reference


@dataclass(frozen=True)
class AggregateOptions:
    """How the sites' updates are combined (module doc). The default is exact FedAvg with capped
    weights: for honest sites whose pairs lie within K_WEIGHT × the median, the exact pair-weighted mean."""

    rule: Literal["mean", "median", "trimmed_mean"] = "mean"
    weights: Literal["pairs", "capped", "uniform"] = "capped"
    weight_cap: float = K_WEIGHT
    clip_norm: float | None = None  # C of Flower's fixed clipping; None: no clipping
    trim: float = 0.2  # trimmed_mean: the share cut from each end (Flower's proportiontocut)


def adapter_factors(site: str, blobs: Mapping[str, bytes], study: LoraStudy | None = None) -> CheckedAdapter:
    """The factors of one PEFT LoRA adapter given as blobs {"adapter_config.json",
    "adapter_model.safetensors"}, parsed in memory (nothing is written to disk). With `study`, the
    coordinator's full check (checks.validate_adapter: the study's scale, exact tensor set, finite);
    without, the scale is read from the site's config (lora_alpha, use_rslora; patterns refused) and
    only lora_A / lora_B pairs of matching rank are accepted, finite."""
    if study is not None:
        return validate_adapter(site, blobs["adapter_config.json"], blobs["adapter_model.safetensors"], study)
    from medmerge.federated.checks import (
        ADAPTER_DTYPES,
        ITEM_SIZE,
        PREFIX,
        buffer_tensor,
        read_safetensors_header,
    )

    def refuse(why: str) -> MedmergeError:
        return MedmergeError(f"site {site}: adapter refused ({why})")

    try:
        config = json.loads(blobs["adapter_config.json"])
        data = blobs["adapter_model.safetensors"]
        entries = read_safetensors_header(data, ITEM_SIZE)
    except (KeyError, ValueError, RecursionError) as exc:
        raise refuse(f"unreadable, {type(exc).__name__}") from None
    if not isinstance(config, dict) or config.get("alpha_pattern") or config.get("rank_pattern"):
        raise refuse("adapter_config.json: alpha_pattern / rank_pattern are not accepted")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise refuse("adapter_config.json: DoRA or fan_in_fan_out adapters are not accepted")
    alpha, rs = config.get("lora_alpha", 8), config.get("use_rslora", False)
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or not isinstance(rs, bool):
        raise refuse("adapter_config.json: lora_alpha / use_rslora")
    size, pairs = int.from_bytes(data[:8], "little"), {}
    for key, entry in entries.items():
        module, _, which = key.removeprefix(PREFIX).rpartition(".lora_")
        if which not in ("A.weight", "B.weight") or len(entry.shape) != 2:
            raise refuse(f"tensor {key[:60]!r} is no lora_A / lora_B matrix")
        tensor = buffer_tensor(data, size, entry, ADAPTER_DTYPES[entry.dtype]).to(torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise refuse(f"tensor {key[:60]!r} has non-finite values")
        pairs.setdefault(f"{module}.weight", {})[which[0]] = tensor
    factors = {}
    for module, found in pairs.items():
        a, b = found.get("A"), found.get("B")
        if a is None or b is None or a.shape[0] != b.shape[1]:
            raise refuse(f"module {module[:60]!r}: lora_A / lora_B missing or of different rank")
        r = a.shape[0]
        factors[module] = LoraFactors(a, b, float(alpha) / (math.sqrt(r) if rs else r))
    if not factors:
        raise refuse("no LoRA factors")
    return CheckedAdapter(site, factors)


def adapter_deltas(
    blobs: Mapping[str, bytes], study: LoraStudy | None = None, site: str = "?"
) -> dict[str, tuple[torch.Tensor, int]]:
    """{base weight name: (ΔW = s·B·A float32 in the weight's orientation, rank r)} of one PEFT LoRA
    adapter given as blobs (adapter_factors: in memory, checked)."""
    return adapter_factors(site, blobs, study).deltas()


def bounded_weights(
    pairs: Mapping[str, float], options: AggregateOptions = AggregateOptions()
) -> dict[str, float]:
    """The w_i of AggregateOptions.weights from the sites' reported pairs (each must be finite and > 0)."""
    for site, value in pairs.items():
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise MedmergeError(f"site {site}: pairs {value!r}: expected a finite positive number")
    if options.weights == "uniform":
        return {s: 1.0 for s in pairs}
    if options.weights == "pairs" or len(pairs) < 2:
        return {s: float(v) for s, v in pairs.items()}
    from medmerge.federated.robust import reference

    raw = {s: float(v) for s, v in pairs.items()}
    return {s: min(v, options.weight_cap * reference(raw, s)) for s, v in raw.items()}


def clip_scales(adapters: Mapping[str, CheckedAdapter], clip_norm: float) -> dict[str, float]:
    """Flower's fixed clipping factor of each site's whole update: min(1, C / ‖ΔW_i‖), ‖ΔW_i‖ the norm of
    all its modules' ΔW flattened together (1 for a zero update)."""
    from medmerge.federated.robust import lora_norm

    scales = {}
    for site, adapter in adapters.items():
        norm = math.sqrt(sum(lora_norm(f) ** 2 for f in adapter.factors.values()))
        scales[site] = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return scales


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """numpy.median along dim 0 (Flower's FedMedian): the middle value, or the mean of the two middle
    values for an even count."""
    n = stack.shape[0]
    ordered = stack.sort(dim=0).values
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, trim: float) -> torch.Tensor:
    """Flower's FedTrimmedAvg along dim 0: drop ⌊trim·n⌋ values from each end per coordinate, average
    the rest (trim ∈ [0, 0.5))."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim {trim}: expected a share in [0, 0.5)")
    n = stack.shape[0]
    cut = int(trim * n)
    return stack.sort(dim=0).values[cut : n - cut].mean(dim=0)


def aggregate(
    updates: Mapping[str, Mapping[str, bytes] | CheckedAdapter],
    weights: Mapping[str, float],
    study: LoraStudy | None = None,
    options: AggregateOptions = AggregateOptions(),
) -> tuple[bytes, dict]:
    """The aggregate of the sites' updates (blobs, or adapters already checked), factored:
    (aggregate.safetensors bytes, info: modules, ranks, the largest SVD relative error (~1e-7 for the
    exact mean: float rounding only), the weights used and each site's clipping factor)."""
    from safetensors.torch import save

    from medmerge.merge.lora import factor

    adapters = {
        s: u if isinstance(u, CheckedAdapter) else adapter_factors(s, u, study) for s, u in updates.items()
    }
    w = bounded_weights({s: weights[s] for s in adapters}, options)
    clip = clip_scales(adapters, options.clip_norm) if options.clip_norm is not None else {}
    total = sum(w.values())
    modules = sorted({m for a in adapters.values() for m in a.factors})
    tensors, error, ranks = {}, 0.0, {}
    for module in modules:
        present = [s for s in adapters if module in adapters[s].factors]
        rank = sum(adapters[s].factors[module].a.shape[0] for s in present)
        deltas = {s: adapters[s].factors[module].delta().mul_(clip.get(s, 1.0)) for s in present}
        if options.rule == "mean":
            merged = sum(deltas[s] * (w[s] / total) for s in present)
        else:
            zero = torch.zeros_like(next(iter(deltas.values())))
            stack = torch.stack([deltas.get(s, zero) for s in adapters])
            merged = (
                coordinate_median(stack) if options.rule == "median" else trimmed_mean(stack, options.trim)
            )
        f = factor(merged, rank)  # the mean: rank ΔW ≤ Σ r_i, nothing dropped
        tensors[f"{module}.A"], tensors[f"{module}.B"] = f.a, f.b
        error, ranks[module] = max(error, f.relative_error), f.rank
    info = {
        "modules": len(modules),
        "max_rank": max(ranks.values(), default=0),
        "max_svd_error": error,
        "rule": options.rule,
        "weights_used": w,
        "clip_scales": clip,
    }
    return save(tensors), info


def read_aggregate(data: bytes) -> dict[str, torch.Tensor]:
    """{weight name: ΔW} of an aggregate; refused (MedmergeError) unless its header is valid, it holds
    `<w>.A` (k, in) / `<w>.B` (out, k) float32 pairs and every value is finite."""
    from medmerge.federated.checks import buffer_tensor, read_safetensors_header

    try:
        entries = read_safetensors_header(data, {"F32": 4})
    except ValueError as why:
        raise MedmergeError(f"{AGGREGATE}: refused ({why})") from None
    size, tensors = int.from_bytes(data[:8], "little"), {}
    for key, entry in entries.items():
        tensor = buffer_tensor(data, size, entry, torch.float32)
        if len(entry.shape) != 2 or key[-2:] not in (".A", ".B") or not bool(torch.isfinite(tensor).all()):
            raise MedmergeError(f"{AGGREGATE}: refused (tensor {key[:60]!r}: expected a finite 2-D .A or .B)")
        tensors[key] = tensor
    deltas = {}
    for key in (k for k in tensors if k.endswith(".A")):
        a, b = tensors[key], tensors.get(f"{key[:-2]}.B")
        if b is None or b.shape[1] != a.shape[0]:
            raise MedmergeError(f"{AGGREGATE}: refused ({key[:-2][:60]!r}: no matching .B factor)")
        deltas[key[:-2]] = b @ a
    if len(deltas) * 2 != len(tensors):
        raise MedmergeError(f"{AGGREGATE}: refused (a .B factor without its .A)")
    return deltas


def apply_aggregate(model: Path, data: bytes, out: Path) -> Path:
    """Write `out`: the model folder `model` with ΔW added to its weights (atomic); other files copied."""
    from safetensors.torch import load_file, save_file

    from medmerge.manifest import atomic_dir

    deltas = read_aggregate(data)
    with atomic_dir(out, overwrite=True) as tmp:
        for file in sorted(model.iterdir()):
            if file.suffix != ".safetensors":
                if file.is_file():
                    shutil.copy2(file, tmp / file.name)
                continue
            state = load_file(str(file))
            for name in [n for n in state if n in deltas]:
                weight = state[name]
                state[name] = (weight.to(torch.float32) + deltas.pop(name)).to(weight.dtype)
            save_file(state, str(tmp / file.name), metadata={"format": "pt"})
        if deltas:
            raise MedmergeError(
                f"{model}: no weight for {len(deltas)} aggregate module(s), e.g. {next(iter(deltas))}"
            )
        (tmp / "fedavg.json").write_text(json.dumps({"from": str(model)}))
    return out
