"""Fixtures of the export tests: single-threaded torch (tiny models; the test machine is shared) and tiny
Llamas whose every layer shapes the output (init std 0.2, ten times the default 0.02, under which
attention barely moves a random tiny model's logits and conversion bugs inside layers would go unseen)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny_llama


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """`medmerge.cli.main` calls logging.basicConfig, binding a handler to the (captured, later closed)
    stderr of the test; drop it afterwards so later logging (uvicorn, tqdm) does not write to it."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reinit(folder: Path, *, tie: bool, std: float = 0.2, seed: int = 1) -> Path:
    """Rebuild the tiny Llama in `folder` with (un)tied embeddings and weights drawn with std `std`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(folder)
    config.tie_word_embeddings = tie
    config.initializer_range = std
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def sharp_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny untied Llama with std-0.2 weights: peaked next-token distributions that depend on every layer."""
    return _reinit(build_tiny_llama(tmp_path_factory.mktemp("models") / "sharp-llama"), tie=False)


@pytest.fixture(scope="session")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Llama with tied input/output embeddings (as SmolLM2-135M), std-0.2 weights."""
    return _reinit(build_tiny_llama(tmp_path_factory.mktemp("models") / "tied-llama"), tie=True)
