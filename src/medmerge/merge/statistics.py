"""Site statistics that data-aware merges read, one tensor at a time, beside each expert's weights.

The format (statistics.safetensors with `gram::<weight name>` and `fisher::<weight name>` tensors, and
statistics.json, its commit record) and its reader are `medmerge.site_stats`; `medmerge stats` makes them
(`medmerge.train.statistics`). This module opens them for the merge engine and says, in one line, which
expert folder lacks what a method needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medmerge.site_stats import TENSORS_FILE, SiteStatistics, has_statistics


def open_statistics(folder: Path) -> SiteStatistics | None:
    """The lazy reader of `folder`'s statistics (tensors read on request), or None where it has none;
    a damaged pair of files is a one-line MedmergeError."""
    return SiteStatistics.open(folder) if has_statistics(folder) else None


@dataclass(frozen=True)
class ExpertData:
    """A method's input beyond θ: the experts' TRAINING DATA, read at merge time (a federation, which
    never sees the sites' data, refuses such methods).

    `run(reference, sources, params, merge, progress)` runs the method's pass over the data on the
    architecture of `reference` (a model folder) and returns {tensor name: (merged tensor, stats)}: it
    merges every tensor through `merge(names, statistics)`, the engine's per-tensor loop fed, per input,
    the statistics of the kinds `statistics` that the pass took. `shortfall(folder)` says in one line why
    an expert folder's data cannot be read (None: it can).
    """

    run: Callable[..., dict[str, Any]]
    shortfall: Callable[[Path], str | None]
    statistics: frozenset[str]


class _Needs(Protocol):
    name: str
    needs_statistics: frozenset[str]
    needs_factors: bool
    data: ExpertData | None


def input_shortfall(spec: _Needs, folders: list[Path]) -> str | None:
    """One line naming the first expert folder that lacks what `spec` needs (statistics of some kind,
    LoRA factors, a readable training set), or None when every folder has it. The engine refuses with
    it; a pipeline may skip."""
    for folder in map(Path, folders):
        if spec.data is not None:
            reason = spec.data.shortfall(folder)
            if reason is not None:
                return reason
        if spec.needs_factors and not (folder / "adapter_config.json").is_file():
            return (
                f"{folder}: {spec.name} merges LoRA factors B·A and needs PEFT LoRA adapters, "
                "but this is a full model folder"
            )
        if spec.needs_statistics:
            stats = open_statistics(folder)
            missing = sorted(k for k in spec.needs_statistics if stats is None or not stats.has(k))
            if missing:
                return (
                    f"{folder}: {spec.name} needs the site's {' and '.join(missing)} statistics "
                    f"({TENSORS_FILE}; make them with: medmerge stats {folder})"
                )
    return None
