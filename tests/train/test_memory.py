"""Trainings in one process follow each other in memory: a finished training frees what it held.

A reference cycle through the trainer (trainer → scheduler → schedule → trainer) kept the model, its
optimizer state and the keep-best copy alive after `train_expert` returned, until Python's next full
collection, so a second training in the same process ran on top of the first one's memory. Full
collections are rare in a long run; this test turns them off while the second expert trains.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
from pathlib import Path

import psutil
import pytest

from medmerge.train import train_expert
from tests.tiny import build_tiny_llama
from tests.train.helpers import tiny_config

TOLERANCE_MIB = 32  # the leak held about 80 MiB of this model (weights, AdamW moments, best copy)


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama of hidden size 512 (about 20 MiB of float32 weights): big enough to see in RSS."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "small-llama", hidden=512)


def _rss_mib() -> float:
    """Resident MiB once glibc has handed free heap pages back (else freed memory still counts)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss / 2**20


def test_a_second_training_does_not_raise_the_baseline(small_llama, tiny_qa_jsonl, tmp_path) -> None:
    config = tiny_config(small_llama, tiny_qa_jsonl, method="full", max_steps=3, eval_every=0)
    train_expert(config, tmp_path / "first", progress=False)  # also pays the one-time lazy imports
    gc.collect()
    baseline = _rss_mib()

    enabled = gc.isenabled()
    gc.disable()  # what a long run sees between its rare full collections
    try:
        train_expert(config, tmp_path / "second", progress=False)
        held = _rss_mib()  # what the finished training still holds, with only reference counting
    finally:
        if enabled:
            gc.enable()
    gc.collect()
    after = _rss_mib()

    assert held - baseline < TOLERANCE_MIB, f"RSS {baseline:.0f} → {held:.0f} MiB after the second training"
    assert after - baseline < TOLERANCE_MIB, f"RSS {baseline:.0f} → {after:.0f} MiB after gc"
    manifest = json.loads((tmp_path / "second" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 3
