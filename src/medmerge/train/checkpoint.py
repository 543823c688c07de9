"""Atomic, pickle-free checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint folder (`<out>.checkpoint/`, replaced atomically each time) holds
  trainable.safetensors   every trainable parameter (LoRA A/B, or the whole model for full)
  optimizer.safetensors   AdamW state: `<param index>.<step|exp_avg|exp_avg_sq>`
  best.safetensors        the trainable state of the best validation loss so far (keep-best)
  rng.safetensors         torch CPU (and CUDA) generator states of every rank
  state.json              step, sampler position, scheduler and optimizer hyper-parameters, loop
                          state (best loss, curve), and the config it was made with.
Tensors go through safetensors and the rest through JSON, so loading one never runs code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medmerge.errors import MedmergeError
from medmerge.manifest import atomic_dir, write_json_atomic

STATE_FILE = "state.json"


def checkpoint_dir(out_dir: str | Path) -> Path:
    """`<out>.checkpoint`, beside the output folder (which only appears, atomically, at the end)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoint")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng_states: list[dict[str, torch.Tensor]],
    best_state: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
) -> None:
    """Write one checkpoint atomically (build in a temp folder, rename over the previous one)."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    opt_tensors = {
        f"{index}.{key}": value
        for index, entries in opt["state"].items()
        for key, value in entries.items()
        if isinstance(value, torch.Tensor)
    }
    rng = {f"{rank}.{key}": value for rank, states in enumerate(rng_states) for key, value in states.items()}
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(_contiguous(trainable), tmp / "trainable.safetensors")
        save_file(_contiguous(opt_tensors), tmp / "optimizer.safetensors")
        save_file(_contiguous(rng), tmp / "rng.safetensors")
        if best_state is not None:
            save_file(_contiguous(best_state), tmp / "best.safetensors")
        payload = {
            **state,
            "param_groups": opt["param_groups"],
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        }
        write_json_atomic(tmp / STATE_FILE, payload)


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; return (state, best_state)."""
    import json

    if not (path / STATE_FILE).is_file():
        raise MedmergeError(
            f"{path}: no checkpoint to resume from (expected {STATE_FILE}; run without --resume)"
        )
    state = json.loads((path / STATE_FILE).read_text())
    trainable = load_file(path / "trainable.safetensors", device=str(device))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(trainable) != expected:
        raise MedmergeError(f"{path}: checkpoint parameters do not match this config's trainable parameters")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    opt_tensors = load_file(path / "optimizer.safetensors", device=str(device))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in opt_tensors.items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    scheduler.load_state_dict({**state.pop("scheduler"), "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng = load_file(path / "rng.safetensors")
    mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"{rank}.")}
    if not mine:
        raise MedmergeError(f"{path}: no RNG state for process {rank} (resume with the same process count)")
    set_rng_state(mine, device)
    best = path / "best.safetensors"
    return state, (load_file(best, device=str(device)) if best.is_file() else None)
