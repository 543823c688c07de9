"""The typed records that pass between the steps of `medmerge run` (and their JSON form on disk).

    TrainedExpert     an expert folder and the step key that made it
    SearchTrial       one trial of a merge search: its setting and the validation loss it scored
    SearchRecord      a method's whole search (search/<method>.json)
    ValidationRecord  one candidate's validation loss (validation.json)

Losses are mean answer NLL per token (nats); `per_dataset` maps a dataset SPEC to its loss. A failed
search trial (a loss that is not finite) has loss inf, written as null.
The JSON files keep the shape they had before these records existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainedExpert:
    name: str
    path: Path
    key: str  # step key of the training that made `path`


@dataclass(frozen=True)
class SearchTrial:
    number: int
    parameters: dict[str, Any]  # the method's parameters (YAML names, e.g. "lambda")
    weights: list[float]  # w_i, one per expert
    loss: float  # mean validation loss over datasets, nats/token
    per_dataset: dict[str, float]
    members: list[str] | None = None  # greedy soup: the experts in this candidate soup

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trial": self.number}
        if self.members is not None:
            out["members"] = list(self.members)
        out |= {"parameters": self.parameters, "weights": self.weights}
        loss = self.loss if math.isfinite(self.loss) else None
        return out | {"loss": loss, "per_dataset": self.per_dataset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchTrial:
        return cls(
            number=data.get("trial", -1),
            parameters=dict(data.get("parameters", {})),
            weights=list(data.get("weights", [])),
            loss=math.inf if data["loss"] is None else float(data["loss"]),
            per_dataset=dict(data["per_dataset"] or {}),
            members=data.get("members"),
        )


@dataclass(frozen=True)
class SearchRecord:
    key: str
    method: str
    best: SearchTrial
    trials: list[SearchTrial] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "method": self.method,
            "best": self.best.to_json(),
            "trials": [t.to_json() for t in self.trials],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchRecord:
        return cls(
            key=data["key"],
            method=data["method"],
            best=SearchTrial.from_json(data["best"]),
            trials=[SearchTrial.from_json(t) for t in data["trials"]],
        )


@dataclass(frozen=True)
class ValidationRecord:
    key: str  # identity of the model scored (its step key, or its checksum)
    path: str
    loss: float  # mean over datasets, nats/token
    per_dataset: dict[str, float]
    source: str = "scored"  # "scored", or "search": taken from the search's best trial

    def to_json(self) -> dict[str, Any]:
        out = {"key": self.key, "path": self.path}
        if self.source != "scored":
            out["from"] = self.source
        return out | {"loss": self.loss, "per_dataset": self.per_dataset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ValidationRecord:
        return cls(
            key=data["key"],
            path=data["path"],
            loss=float(data["loss"]),
            per_dataset=dict(data["per_dataset"]),
            source=data.get("from", "scored"),
        )
