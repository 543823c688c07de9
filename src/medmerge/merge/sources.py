"""Inputs of a merge, read one tensor at a time: Hugging Face model folders and PEFT LoRA adapters.

`open_source(path, base)` returns a `Source`: its tensor names and shapes (`infos`) and `read(name)`.
An adapter source is its base model with ΔW = s·B·A added to each adapted weight (medmerge.merge.lora),
so it behaves exactly like the full model `merge_and_unload()` would produce, without building it;
`factors(name)` gives the low-rank factors of that update for methods that merge them (Core Space).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medmerge.errors import MedmergeError
from medmerge.merge.lora import LoraModule, delta_weight, lora_factors, read_adapter
from medmerge.merge.tensors import TensorInfo, folder_tensors, read_tensor


@dataclass
class Source:
    """A full model folder."""

    path: Path
    infos: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        return False

    def read(self, name: str, copy: bool = False) -> torch.Tensor:
        """Tensor `name`; `copy`: in new memory the caller may write to cheaply (else memory-mapped)."""
        return read_tensor(self.infos[name], copy)

    def touches(self, name: str) -> bool:
        """Whether this input's `name` may differ from its base (a full model: always)."""
        return True

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Low-rank factors (B′ (out, r), A′ (r, in)) with θ − θ_base = B′·A′, or None when `name`'s
        update is not low-rank (a full model's, or a saved replacement)."""
        return None

    def weight_files(self) -> list[Path]:
        return sorted({info.file for info in self.infos.values()})


@dataclass
class AdapterSource(Source):
    """A LoRA adapter on `base`: θ_base + ΔW on adapted weights, saved replacements, θ_base elsewhere."""

    base: Source | None = None
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replaced: dict[str, TensorInfo] = field(default_factory=dict)
    adapter_config: dict = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        return True

    def touches(self, name: str) -> bool:
        return name in self.modules or name in self.replaced

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(s·B, A) of the module adapting `name` (transposed modules: (s·Aᵀ, Bᵀ)), rank-0 factors for
        a weight the adapter leaves as its base, None for a saved replacement (not low-rank)."""
        if name in self.replaced:
            return None
        module = self.modules.get(name)
        if module is None:
            shape = self.infos[name].shape
            out, cols = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
            return torch.zeros(out, 0), torch.zeros(0, cols)
        return lora_factors(module)

    def read(self, name: str, copy: bool = False) -> torch.Tensor:
        if name in self.replaced:
            return read_tensor(self.replaced[name], copy)
        module = self.modules.get(name)
        theta = self.base.read(name, copy=copy or module is not None)  # ΔW is added in place
        if module is None:
            return theta
        delta = delta_weight(module)
        if delta.shape != theta.shape:
            raise MedmergeError(
                f"{self.path}: ΔW of {name} has shape {tuple(delta.shape)} "
                f"but the base weight is {tuple(theta.shape)}"
            )
        return theta.to(torch.float32).add_(delta)

    def weight_files(self) -> list[Path]:
        return [self.path / "adapter_model.safetensors"]


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        return {}
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise MedmergeError(f"{config_path}: invalid JSON ({exc})") from None


def open_source(path: Path, base: Source | None) -> Source:
    """A full model folder, or (with `base`) a PEFT LoRA adapter folder applied to `base`."""
    if (path / "adapter_config.json").is_file():
        if base is None:
            raise MedmergeError(f"{path}: a LoRA adapter needs base_model (the model it was trained on)")
        modules, replaced, adapter_config = read_adapter(path)
        for name in [*modules, *replaced]:
            if name not in base.infos:
                raise MedmergeError(
                    f"{path}: adapter targets {name}, which base model {base.path} does not have"
                )
        return AdapterSource(
            path=path,
            infos=base.infos,
            config=base.config,
            base=base,
            modules=modules,
            replaced=replaced,
            adapter_config=adapter_config,
        )
    return Source(path=path, infos=folder_tensors(path), config=read_config(path))
