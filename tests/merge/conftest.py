"""Fixtures of the merge tests: LoRA adapters on the tiny Llama, and expert copies of the tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny_llama, build_tiny_t5


def make_adapter(base: Path, out: Path, seed: int, r: int = 4, alpha: float = 8.0, **lora_kw) -> Path:
    """A PEFT LoRA adapter on `base` with random (non-zero) A and B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"], **lora_kw)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_experts(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> list[Path]:
    """Two tiny Llamas with the tiny_llama's architecture and tokenizer but other random weights."""
    root = tmp_path_factory.mktemp("llama-experts")
    return [build_tiny_llama(root / f"expert-{seed}", seed=seed) for seed in (1, 2)]


@pytest.fixture(scope="session")
def t5_experts(tmp_path_factory: pytest.TempPathFactory, tiny_t5: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("t5-experts")
    return [build_tiny_t5(root / f"expert-{seed}", seed=seed) for seed in (1, 2)]


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> list[Path]:
    """Two LoRA adapters on tiny_llama: r=4 α=8, and rsLoRA r=2 α=4."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(tiny_llama, root / "lora-a", seed=1),
        make_adapter(tiny_llama, root / "lora-b", seed=2, r=2, alpha=4.0, use_rslora=True),
    ]
