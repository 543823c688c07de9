"""Checkpoints: Ctrl-C leaves a usable one, and resuming reaches exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal

import pytest
from safetensors.torch import load_file

from medmerge.errors import MedmergeError
from medmerge.train import train_expert
from medmerge.train.checkpoint import checkpoint_dir
from tests.train.helpers import tiny_config


def _ctrl_c_at(step: int):
    def hook(trainer, at: int) -> None:
        if at == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    # dropout > 0 and grad_accum > 1: resuming must restore the RNG and the sampler position too
    config = tiny_config(
        tiny_llama,
        tiny_qa_jsonl,
        max_steps=10,
        eval_every=4,
        checkpoint_every=3,
        grad_accum=2,
        lora={"dropout": 0.1},
    )
    whole = tmp_path / "whole"
    train_expert(config, whole, progress=False)

    parted = tmp_path / "parted"
    with pytest.raises(KeyboardInterrupt):
        train_expert(config, parted, progress=False, hooks=[_ctrl_c_at(5)])
    assert not parted.exists()  # the output only appears when complete
    state = json.loads((checkpoint_dir(parted) / "state.json").read_text())
    assert state["loop"]["step"] == 5  # saved at the step Ctrl-C arrived, not the last periodic one
    with pytest.raises(MedmergeError, match="--resume"):
        train_expert(config, parted, progress=False)
    train_expert(config, parted, resume=True, progress=False)
    assert not checkpoint_dir(parted).exists()

    a, b = load_file(whole / "adapter_model.safetensors"), load_file(parted / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
    ma = json.loads((whole / "manifest.json").read_text())["metrics"]
    mb = json.loads((parted / "manifest.json").read_text())["metrics"]
    assert mb["val_loss_final"] == pytest.approx(ma["val_loss_final"], abs=1e-5)
    assert mb["train_loss_last"] == pytest.approx(ma["train_loss_last"], abs=1e-5)
    assert mb["steps"] == ma["steps"] == 10


def test_resume_without_a_checkpoint_is_an_error(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    with pytest.raises(MedmergeError, match="no checkpoint"):
        train_expert(tiny_config(tiny_llama, tiny_qa_jsonl), tmp_path / "x", resume=True, progress=False)
