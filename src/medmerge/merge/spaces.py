"""Search spaces of the merge methods' knobs: (Optuna trial, number of models) → a `Setting`.

A space only calls `trial.suggest_float(name, low, high)`, so any object with that method drives it
(an Optuna trial in the search, a recorder that lists the knob names). Knob names are the YAML names
of the method's parameters, plus `w0`, `w1`, … for the model weights. The order of the suggestions is
part of a space: a seeded sampler draws them in that order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One choice of a method's parameters (YAML names) and of the model weights (None: all 1)."""

    parameters: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None


Space = Callable[[Any, int], Setting]


def suggest_weights(trial: Any, n: int) -> list[float]:
    """w_i ∈ [0.1, 1], one per model."""
    return [trial.suggest_float(f"w{i}", 0.1, 1.0) for i in range(n)]


def weights_only(trial: Any, n: int) -> Setting:
    """No parameters; the weights w_i ∈ [0.1, 1] are searched."""
    return Setting({}, suggest_weights(trial, n))


def unit_weights(trial: Any, n: int) -> Setting:
    """No knobs at all: no parameters, every weight 1."""
    return Setting({}, [1.0] * n)


def interpolation(trial: Any, n: int) -> Setting:
    """t ∈ [0, 1], weights 1."""
    return Setting({"t": trial.suggest_float("t", 0.0, 1.0)}, [1.0] * n)


def task_vector_space(*extra: str) -> Space:
    """λ ∈ [0.3, 1.5], w_i ∈ [0.1, 1], plus: density ∈ [0.1, 1] ([0.2, 0.9] with epsilon),
    gamma ∈ [0, 0.05], epsilon ∈ [0, 0.1] — the ones named in `extra`."""

    def space(trial: Any, n: int) -> Setting:
        parameters: dict[str, Any] = {"lambda": trial.suggest_float("lambda", 0.3, 1.5)}
        if "density" in extra:
            low = 0.2 if "epsilon" in extra else 0.1
            parameters["density"] = trial.suggest_float("density", low, 0.9 if "epsilon" in extra else 1.0)
        if "gamma" in extra:
            parameters["gamma"] = trial.suggest_float("gamma", 0.0, 0.05)
        if "epsilon" in extra:
            parameters["epsilon"] = trial.suggest_float("epsilon", 0.0, 0.1)
        return Setting(parameters, suggest_weights(trial, n))

    return space


def with_knobs(space: Space, **ranges: tuple[float, float]) -> Space:
    """`space`, then each named parameter drawn from its (low, high) range, in the order given."""

    def extended(trial: Any, n: int) -> Setting:
        setting = space(trial, n)
        drawn = {name: trial.suggest_float(name, low, high) for name, (low, high) in ranges.items()}
        return Setting({**setting.parameters, **drawn}, setting.weights)

    return extended


def knob_names(space: Space, n: int) -> list[str]:
    """The names `space` suggests for `n` models, in order (recorded by a stand-in trial)."""
    names: list[str] = []

    class Recorder:
        def suggest_float(self, name: str, low: float, high: float) -> float:
            names.append(name)
            return low

    space(Recorder(), n)
    return names
