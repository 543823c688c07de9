"""LoRA adapters as exact weight updates, and merged updates re-factored into LoRA by truncated SVD.

A PEFT LoRA module holds A (r, in) and B (out, r); its update of the frozen weight W (out, in) is
    ΔW = s · B·A,  s = lora_alpha / r   (rsLoRA: s = lora_alpha / √r),
transposed for `fan_in_fan_out` layers (GPT-2 Conv1D) and for embeddings (A (r, vocab), B (dim, r):
ΔW = s·(B·A)ᵀ, shape (vocab, dim)). medmerge merges adapters through ΔW — never by averaging A and B
separately, which adds cross terms (Σ w_i B_i)(Σ w_i A_i) ≠ Σ w_i B_i A_i.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from medmerge.errors import MedmergeError
from medmerge.merge.tensors import TensorInfo, read_header, read_tensor

PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: where A and B are, and the scale s of ΔW = s·B·A."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    transpose: bool  # fan_in_fan_out or embedding: ΔW = s·(B·A)ᵀ


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module name's end."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_adapter(folder: Path) -> tuple[dict[str, LoraModule], dict[str, TensorInfo], dict]:
    """Parse a PEFT LoRA folder: {base weight name: LoraModule}, {base tensor name: full replacement}
    (modules_to_save, trained biases), and the adapter config."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise MedmergeError(
            f"{config_path}: peft_type {config.get('peft_type')!r} is not supported (expected LORA)"
        )
    if config.get("use_dora"):
        raise MedmergeError(f"{config_path}: DoRA adapters are not supported (ΔW depends on the weight norm)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise MedmergeError(f"{folder}: no adapter_model.safetensors (medmerge reads safetensors only)")
    infos, _ = read_header(weights)
    alpha = float(config.get("lora_alpha", 8))
    rs = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    pairs: dict[str, dict[str, TensorInfo]] = {}
    replaced: dict[str, TensorInfo] = {}
    for key, info in infos.items():
        name = key.removeprefix(PREFIX)
        match = re.fullmatch(r"(.+)\.lora_(A|B|embedding_A|embedding_B)(?:\.weight)?", name)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = info
        else:
            replaced[name.replace(".modules_to_save", "").replace(".original_module", "")] = info
    modules: dict[str, LoraModule] = {}
    for module, found in pairs.items():
        embedding = "embedding_A" in found
        a, b = (
            (found.get("embedding_A"), found.get("embedding_B"))
            if embedding
            else (found.get("A"), found.get("B"))
        )
        if a is None or b is None:
            raise MedmergeError(f"{weights}: module {module} has only one of lora_A / lora_B")
        r = a.shape[0]
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        scale = module_alpha / math.sqrt(r) if rs else module_alpha / r
        modules[f"{module}.weight"] = LoraModule(a, b, scale, transpose=embedding or fan_in_fan_out)
    return modules, replaced, config


def delta_weight(module: LoraModule) -> torch.Tensor:
    """ΔW = s·B·A (or its transpose), float32."""
    a = read_tensor(module.a).to(torch.float32)  # (r, in)
    b = read_tensor(module.b).to(torch.float32)  # (out, r)
    delta = (b @ a).mul_(module.scale)  # (out, in)
    return delta.T.contiguous() if module.transpose else delta


@dataclass(frozen=True)
class Factored:
    """ΔW ≈ B·A with B (out, k) = U_k·diag(S_k), A (k, in) = V_kᵀ; error = ‖ΔW − B·A‖_F / ‖ΔW‖_F."""

    a: torch.Tensor
    b: torch.Tensor
    relative_error: float
    rank: int


def factor(delta: torch.Tensor, rank: int) -> Factored:
    """Best rank-k approximation of ΔW (Eckart–Young) by exact SVD in float32 (float64 when small).

    relative_error = √(Σ_{j>k} σ_j²) / √(Σ_j σ_j²), the Frobenius error of the truncation (0 for ΔW = 0).
    k is min(rank, out, in). Stored with lora_alpha = k so that PEFT's scale s = 1.
    """
    k = min(rank, *delta.shape)
    work = delta.to(torch.float64) if delta.numel() <= 4_000_000 else delta
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    total = float(s.square().sum())
    tail = float(s[k:].square().sum())
    error = math.sqrt(tail / total) if total > 0 else 0.0
    b = (u[:, :k] * s[:k]).to(torch.float32).contiguous()
    a = vh[:k].to(torch.float32).contiguous()
    return Factored(a=a, b=b, relative_error=error, rank=k)


def lora_factors(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(B′, A′) float32 with ΔW = B′·A′ in the weight's own (out, in) orientation: B′ = s·B, A′ = A,
    or, for transposed modules, B′ = s·Aᵀ and A′ = Bᵀ."""
    a = read_tensor(module.a).to(torch.float32)  # (r, in)
    b = read_tensor(module.b).to(torch.float32)  # (out, r)
    if module.transpose:
        return a.T.mul(module.scale), b.T.contiguous()
    return b.mul_(module.scale), a
