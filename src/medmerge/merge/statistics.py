"""Site statistics that data-aware merges read, one tensor at a time, beside each expert's weights.

An expert folder (model or LoRA adapter) may hold `statistics.safetensors`, with tensors
`gram::<weight name>` (float32 (in, in): Σ over the site's answer tokens of x xᵀ, x the input of that
Linear) and `fisher::<weight name>` (float32, the weight's shape: mean over examples of the squared
gradient of the example's answer log-likelihood), and `statistics.json` ({"examples": n, "tokens": t,
"kinds": [...], ...}). How a site produces them is not the merge's business; this module only reads
them, through `open_statistics` (the one place to swap for a shared format reader).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from medmerge.merge.tensors import TensorInfo, read_header, read_tensor

STATISTICS_FILE = "statistics.safetensors"
SEPARATOR = "::"


@dataclass(frozen=True)
class Statistics:
    """The statistics of one expert folder: which kinds it holds, and `read(kind, name)`."""

    folder: Path
    infos: dict[str, TensorInfo]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(key.split(SEPARATOR, 1)[0] for key in self.infos if SEPARATOR in key)

    def read(self, kind: str, name: str) -> torch.Tensor | None:
        """The float32 statistic `kind` of weight `name`, or None when the site has none for it."""
        info = self.infos.get(f"{kind}{SEPARATOR}{name}")
        return None if info is None else read_tensor(info).to(torch.float32)


def open_statistics(folder: Path) -> Statistics | None:
    """The statistics beside an expert's weights (only the header is read), or None without a file."""
    path = Path(folder) / STATISTICS_FILE
    if not path.is_file():
        return None
    infos, _ = read_header(path)
    return Statistics(Path(folder), infos)


class _Needs(Protocol):
    name: str
    needs_statistics: frozenset[str]
    needs_factors: bool


def input_shortfall(spec: _Needs, folders: list[Path]) -> str | None:
    """One line naming the first expert folder that lacks what `spec` needs (statistics of some kind,
    LoRA factors), or None when every folder has it. The engine refuses with it; a pipeline may skip."""
    for folder in folders:
        folder = Path(folder)
        if spec.needs_factors and not (folder / "adapter_config.json").is_file():
            return (
                f"{folder}: {spec.name} merges LoRA factors B·A and needs PEFT LoRA adapters, "
                "but this is a full model folder"
            )
        if spec.needs_statistics:
            stats = open_statistics(folder)
            missing = sorted(spec.needs_statistics - (stats.kinds if stats else frozenset()))
            if missing:
                return (
                    f"{folder}: {spec.name} needs the site's {' and '.join(missing)} statistics "
                    f"({STATISTICS_FILE} with {missing[0]}{SEPARATOR}<weight name> tensors), "
                    f"{'which it lacks' if stats else 'and the folder has none'}"
                )
    return None
