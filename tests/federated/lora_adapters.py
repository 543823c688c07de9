"""Real PEFT LoRA adapters of the tiny Llama for the coordinator's checks (tests of checks, robust and
fedavg): written by PEFT's own save_pretrained, as a site's training writes them, with seeded B factors
(an untrained LoRA has B = 0)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load, save

from medmerge.config.train import LoraSettings

SETTINGS = LoraSettings(r=4, alpha=8.0, dropout=0.0)
FILES = ("adapter_config.json", "adapter_model.safetensors")
COMMON_SEED = 1234  # what honest sites' updates share (a common direction), for the direction tests


def peft_adapter(base: Path, folder: Path, seed: int, shared: float = 0.0) -> dict[str, bytes]:
    """A PEFT adapter of `base` with SETTINGS: A as PEFT initialises it (seed 0, as every site of a study
    does), B = shared·common + (1 − shared)·own (standard normals × 0.1, `common` the same for every
    seed); returns its two files' bytes."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from medmerge.train.model import lora_config

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), lora_config(SETTINGS, "causal", str(base))
    )
    own, common = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(COMMON_SEED)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            mine = torch.randn(p.shape, generator=own)
            theirs = torch.randn(p.shape, generator=common)
            p.data = 0.1 * (shared * theirs + (1 - shared) * mine)
    model.save_pretrained(folder)
    return {f: (folder / f).read_bytes() for f in FILES}


def edit(blobs: dict[str, bytes], config: dict | None = None, tensors=None) -> dict[str, bytes]:
    """`blobs` with its config updated by `config` and its tensors replaced by tensors(old) when given."""
    out = dict(blobs)
    if config is not None:
        out["adapter_config.json"] = json.dumps(json.loads(blobs["adapter_config.json"]) | config).encode()
    if tensors is not None:
        out["adapter_model.safetensors"] = save(tensors(load(blobs["adapter_model.safetensors"])))
    return out


def scaled(blobs: dict[str, bytes], factor: float) -> dict[str, bytes]:
    """ΔW × factor (every lora_B multiplied): ×1000 is the norm attack, −1 the sign flip."""
    return edit(blobs, tensors=lambda t: {k: v * factor if ".lora_B." in k else v for k, v in t.items()})
