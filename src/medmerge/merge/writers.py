"""Writing a merge's output: full-model safetensors shards, or a PEFT LoRA adapter re-factored by SVD.

Both consume the engine's stream of (name, merged float32 tensor, stats) one tensor at a time and
return (per-tensor stats, extra manifest entries). Side files (config, generation config, tokenizer)
come from the reference folder, with the config's dtype set to the output's.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from medmerge.config import MergeConfig
from medmerge.merge.lora import factor
from medmerge.merge.sources import Source

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".safetensors.index.json",
    ".bin.index.json",
)
_NOT_COPIED = {
    "merge.json",
    "medmerge-model.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",  # the reference's own model card: the merge writes its own
    "mergekit_config.yml",
}
Stream = Iterable[tuple[str, torch.Tensor, dict]]


def _copy_side_files(source_dir: Path, out: Path, dtype: str) -> None:
    """Config, generation config and tokenizer files of the reference folder; config dtype set to `dtype`."""
    for file in sorted(source_dir.iterdir()):
        if not file.is_file() or file.name in _NOT_COPIED or file.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if file.name == "config.json":
            config = json.loads(file.read_text())
            config["dtype" if "dtype" in config else "torch_dtype"] = dtype
            (out / file.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copy2(file, out / file.name)


def write_full(config: MergeConfig, reference: Source, stream: Stream, tmp: Path) -> tuple[dict, dict]:
    """Safetensors shards of at most `config.shard_mb` (headers planned from `reference`) + side files."""
    from medmerge.merge.tensors import ShardWriter

    dtype = DTYPES[config.dtype]
    plan = [(n, dtype if i.dtype.is_floating_point else i.dtype, i.shape) for n, i in reference.infos.items()]
    writer = ShardWriter(tmp, plan, int(config.shard_mb * 1024 * 1024))
    stats: dict[str, dict] = {}
    for name, tensor, tensor_stats in stream:
        writer.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        stats[name] = tensor_stats
        del tensor  # free it before the engine reads the next tensors
    writer.close()
    _copy_side_files(reference.path, tmp, config.dtype)
    return stats, {"shards": writer.names}


def _module_types(reference: Source) -> dict[str, str]:
    """{weight name: "linear" | "embedding"} of the reference architecture, from a meta-device model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    hf_config = AutoConfig.from_pretrained(reference.path)
    auto = AutoModelForSeq2SeqLM if getattr(hf_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_config)
    types = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            types[f"{module_name}.weight"] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            types[f"{module_name}.weight"] = "embedding"
    return types


def _adapter_config(
    config: MergeConfig, reference: Source, base: Source, targets: list[str], rank_pattern: dict[str, int]
) -> dict[str, object]:
    """PEFT's adapter_config.json of the re-factored update: rank k, lora_alpha k (scale 1), no dropout."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if reference.config.get("is_encoder_decoder") else "CAUSAL_LM",
        "base_model_name_or_path": str(base.path.resolve()),  # absolute: PEFT loads it offline
        "r": config.rank,
        "lora_alpha": config.rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_lora(
    config: MergeConfig, reference: Source, base: Source, stream: Stream, tmp: Path
) -> tuple[dict, dict]:
    """ΔW = θ_merged − θ_base of every Linear / Embedding weight, factored by truncated SVD to rank k."""
    from safetensors.torch import save_file

    types = _module_types(reference)
    tensors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    targets, rank_pattern, not_representable = [], {}, {}
    for name, tensor, tensor_stats in stream:
        stats[name] = tensor_stats
        if not tensor.is_floating_point():
            continue
        delta = tensor - base.read(name).to(torch.float32)
        delta_norm = float(delta.norm())
        if delta_norm == 0.0:
            continue
        kind = types.get(name)
        if kind is None or delta.dim() != 2:
            not_representable[name] = delta_norm / max(float(tensor.norm()), 1e-12)
            continue
        module = name.removesuffix(".weight")
        f = factor(delta, config.rank)
        stats[name] = {**tensor_stats, "lora_rank": f.rank, "svd_relative_error": f.relative_error}
        prefix = f"base_model.model.{module}"
        if kind == "linear":
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = f.a, f.b
        else:  # embedding: ΔW (vocab, dim) = (B_e·A_e)ᵀ with A_e (k, vocab), B_e (dim, k)
            tensors[f"{prefix}.lora_embedding_A"] = f.b.T.contiguous()
            tensors[f"{prefix}.lora_embedding_B"] = f.a.T.contiguous()
        targets.append(module)
        if f.rank != config.rank:
            rank_pattern[module] = f.rank
    if not_representable:
        log.warning(
            "%d changed tensors are not Linear/Embedding weights and are not in the adapter: %s",
            len(not_representable),
            ", ".join(list(not_representable)[:5]),
        )
    dtype = DTYPES[config.dtype]
    save_file(
        {k: v.to(dtype) for k, v in tensors.items()},
        str(tmp / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    adapter_config = _adapter_config(config, reference, base, targets, rank_pattern)
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    _copy_side_files(reference.path, tmp, config.dtype)
    (tmp / "config.json").unlink(missing_ok=True)  # an adapter folder carries adapter_config.json only
    errors = [s["svd_relative_error"] for s in stats.values() if "svd_relative_error" in s]
    return stats, {
        "lora": {
            "rank": config.rank,
            "modules": len(targets),
            "max_svd_relative_error": max(errors, default=0.0),
            "not_representable": not_representable,
        }
    }
