"""Search spaces of the merge methods, read from their parameter models (medmerge.merge.params).

A space is (Optuna trial, number of models) → a `Setting`. It only calls
`trial.suggest_float(name, low, high)`, so any object with that method drives it (an Optuna trial in the
search, a recorder that lists the knob names). Knob names are the YAML names of the method's parameters,
plus `w0`, `w1`, … for the model weights. The order of the suggestions is part of a space: a seeded
sampler draws them in that order (the fields' `order`, then their declaration order; weights at
`params.WEIGHTS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medmerge.merge.params import WEIGHTS, MethodParams

WEIGHT_RANGE = (0.1, 1.0)  # w_i ∈ [0.1, 1] when a method's weights are searched


@dataclass(frozen=True)
class Setting:
    """One choice of a method's parameters (YAML names) and of the model weights (None: all 1)."""

    parameters: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None


Space = Callable[[Any, int], Setting]


@dataclass(frozen=True)
class Knob:
    """One searched parameter: YAML name, range, first-trial value, draw order."""

    name: str
    low: float
    high: float
    first: Any
    order: int


def knobs(params: type[MethodParams]) -> list[Knob]:
    """The searched fields of `params`, in draw order."""
    found = []
    for name, info in params.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and "search" in extra:
            s: Any = extra["search"]
            first = info.default if s["first"] is None else s["first"]
            found.append(Knob(info.alias or name, s["low"], s["high"], first, s["order"]))
    return sorted(found, key=lambda k: k.order)  # stable: declaration order within an order


def space_of(params: type[MethodParams]) -> Space:
    """The search space `params` declares (module doc)."""
    declared = knobs(params)

    def space(trial: Any, n: int) -> Setting:
        parameters: dict[str, Any] = {}
        weights = None if params.search_weights else [1.0] * n
        steps: list[Knob | None] = [*declared, *([None] if params.search_weights else [])]
        for knob in sorted(steps, key=lambda k: WEIGHTS if k is None else k.order):
            if knob is None:
                weights = [trial.suggest_float(f"w{i}", *WEIGHT_RANGE) for i in range(n)]
            else:
                parameters[knob.name] = trial.suggest_float(knob.name, knob.low, knob.high)
        return Setting(parameters, weights)

    return space


def first_setting(params: type[MethodParams]) -> dict[str, Any]:
    """The parameters of a search's first trial (YAML names): each knob's `first` value."""
    return {k.name: k.first for k in knobs(params)}


def knob_names(space: Space, n: int) -> list[str]:
    """The names `space` suggests for `n` models, in order (recorded by a stand-in trial)."""
    names: list[str] = []

    class Recorder:
        def suggest_float(self, name: str, low: float, high: float) -> float:
            names.append(name)
            return low

    space(Recorder(), n)
    return names
