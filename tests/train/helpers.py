"""Helpers for training tests: a config on the tiny models and a hook that snapshots weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medmerge.config import TrainConfig, validate_config


def tiny_config(model: Path, data_path: Path, **overrides: Any) -> TrainConfig:
    """A quick config on a tiny model: 1 thread (the CPUs are shared), no warm-up dawdling."""
    settings: dict[str, Any] = {
        "model": str(model),
        "method": "lora",
        "data": {"specs": [f"jsonl:{data_path}"]},
        "batch_size": 4,
        "max_steps": 24,
        "learning_rate": 1e-2,
        "warmup_steps": 2,
        "eval_every": 12,
        "checkpoint_every": 0,
        "threads": 1,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return validate_config(settings, TrainConfig, "test config")


class Snapshots:
    """A loop hook keeping clones of every parameter (and 4-bit buffer) at the first and last step."""

    def __init__(self) -> None:
        self.first: dict[str, torch.Tensor] = {}
        self.last: dict[str, torch.Tensor] = {}
        self.model: Any = None

    @staticmethod
    def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
        }

    def __call__(self, trainer: Any, step: int) -> None:
        self.model = trainer.model
        if step == 0:
            self.first = self._state(trainer.model)

    def finish(self) -> None:
        self.last = self._state(self.model)

    def changed(self, name: str) -> bool:
        return not torch.equal(self.first[name], self.last[name])
