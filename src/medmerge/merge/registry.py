"""The one registry of merge methods: name → parameters model, input contract and tensor function.

Every method name medmerge accepts is a key of `METHODS`; `get_method(name)` raises a one-line error
listing the choices. Parameter models forbid unknown keys, so a misspelt parameter is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ConfigDict, Field, model_validator

from medmerge.config.base import StrictModel
from medmerge.errors import MedmergeError
from medmerge.merge import methods
from medmerge.merge.methods import Merged


class NoParams(StrictModel):
    """No parameters."""


class SlerpParams(StrictModel):
    t: float = Field(ge=0.0, le=1.0, description="0 → first model, 1 → second")
    relative: bool = Field(False, description="interpolate task vectors τ_i and add to base_model")
    rowwise: bool = Field(False, description="one angle per row (first axis) instead of per tensor")


class TaskArithmeticParams(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    lam: float = Field(1.0, alias="lambda", description="scale λ of the merged task vector")
    normalize: bool = Field(False, description="divide Σ w_i τ_i by Σ w_i")


class TiesParams(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    density: float = Field(gt=0.0, le=1.0, description="fraction of entries of each τ_i kept")
    lam: float = Field(1.0, alias="lambda")


class DareTiesParams(TiesParams):
    seed: int = Field(0, description="seed of the random masks (with tensor name and model index)")
    rescale: bool = Field(True, description="divide survivors by their keep probability (E[τ̂] = τ)")


class DareLinearParams(DareTiesParams):
    normalize: bool = Field(False, description="divide Σ w_i τ̂_i by Σ w_i")


class BreadcrumbsTiesParams(TiesParams):
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest-|τ| outliers dropped")


class BreadcrumbsParams(BreadcrumbsTiesParams):
    normalize: bool = Field(False, description="divide Σ w_i τ̂_i by Σ w_i")


class DellaParams(DareTiesParams):
    epsilon: float = Field(0.1, ge=0.0, description="keep probabilities span density ± epsilon")

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        if self.density - self.epsilon <= 0 or self.density + self.epsilon > 1:
            raise ValueError(f"density ± epsilon must lie in (0, 1], got {self.density} ± {self.epsilon}")
        return self


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide Σ w_i τ̂_i by Σ w_i")


class ModelStockParams(StrictModel):
    filter_wise: bool = Field(False, description="one ratio t per row instead of per tensor")


class KarcherParams(StrictModel):
    max_iter: int = Field(10, ge=1)
    tol: float = Field(1e-5, gt=0.0)


TensorFn = Callable[[str, torch.Tensor | None, Sequence[torch.Tensor], Sequence[float], Any], Merged]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type[StrictModel]
    base: str  # "required": θ_base enters the math; "optional": only with relative: true; "unused"
    min_models: int
    max_models: int | None
    merge: TensorFn | None  # None: not a per-tensor method (soup_greedy); may overwrite its `thetas`
    summary: str
    consensus: bool = False
    # the stats carry ‖τ_i‖ for each model: finite exactly when θ_i and θ_base are (the engine then skips
    # its separate NaN/Inf pass over the inputs)
    task_vectors: bool = False


def _gta(sparsifier: methods.Sparsifier, consensus: bool) -> TensorFn:
    def gta_merge(name: str, base, thetas, weights, p) -> Merged:
        return methods.generalized_task_arithmetic(
            base,
            thetas,
            weights,
            sparsifier=sparsifier,
            density=getattr(p, "density", 1.0),
            gamma=getattr(p, "gamma", 0.0),
            epsilon=getattr(p, "epsilon", 0.0),
            rescale=getattr(p, "rescale", True),
            sign_consensus=consensus,
            normalize=getattr(p, "normalize", False),
            lam=p.lam,
            seed=getattr(p, "seed", 0),
            name=name,
            consume=True,
        )

    return gta_merge


def _linear(name, base, thetas, weights, p) -> Merged:
    return Merged(methods.linear(thetas, weights))


def _slerp(name, base, thetas, weights, p: SlerpParams) -> Merged:
    if not p.relative:
        return methods.slerp(p.t, thetas[0], thetas[1], rowwise=p.rowwise)
    result = methods.slerp(p.t, thetas[0] - base, thetas[1] - base, rowwise=p.rowwise)
    return Merged(result.tensor.add_(base), result.stats)


def _model_stock(name, base, thetas, weights, p: ModelStockParams) -> Merged:
    return methods.model_stock(base, thetas, filter_wise=p.filter_wise)


def _karcher(name, base, thetas, weights, p: KarcherParams) -> Merged:
    return methods.karcher(thetas, weights, max_iter=p.max_iter, tol=p.tol)


def _spec(name, params, base, min_models, max_models, merge, summary, consensus=False) -> MethodSpec:
    task_vectors = getattr(merge, "__name__", "") == "gta_merge"
    return MethodSpec(name, params, base, min_models, max_models, merge, summary, consensus, task_vectors)


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in [
        _spec("linear", NoParams, "unused", 1, None, _linear, "Σ w_i θ_i / Σ w_i (model soup)"),
        _spec("soup_greedy", NoParams, "unused", 1, None, None, "greedy soup by validation score"),
        _spec("slerp", SlerpParams, "optional", 2, 2, _slerp, "spherical interpolation of two models"),
        _spec(
            "task_arithmetic",
            TaskArithmeticParams,
            "required",
            1,
            None,
            _gta("none", False),
            "θ_base + λ Σ w_i τ_i",
        ),
        _spec(
            "ties",
            TiesParams,
            "required",
            1,
            None,
            _gta("magnitude", True),
            "trim, elect sign, disjoint mean",
            True,
        ),
        _spec(
            "dare_linear",
            DareLinearParams,
            "required",
            1,
            None,
            _gta("bernoulli", False),
            "random drop + rescale, sum",
        ),
        _spec(
            "dare_ties",
            DareTiesParams,
            "required",
            1,
            None,
            _gta("bernoulli", True),
            "random drop + TIES",
            True,
        ),
        _spec(
            "breadcrumbs",
            BreadcrumbsParams,
            "required",
            1,
            None,
            _gta("breadcrumbs", False),
            "drop tails, sum",
        ),
        _spec(
            "breadcrumbs_ties",
            BreadcrumbsTiesParams,
            "required",
            1,
            None,
            _gta("breadcrumbs", True),
            "drop tails + TIES",
            True,
        ),
        _spec("della", DellaParams, "required", 1, None, _gta("della", True), "ranked drop + TIES", True),
        _spec(
            "della_linear", DellaLinearParams, "required", 1, None, _gta("della", False), "ranked drop, sum"
        ),
        _spec(
            "model_stock", ModelStockParams, "required", 2, None, _model_stock, "ratio from task-vector angle"
        ),
        _spec("karcher", KarcherParams, "unused", 1, None, _karcher, "Riemannian mean on the sphere"),
    ]
}


def get_method(name: str) -> MethodSpec:
    """The spec of method `name`, or a one-line error listing the choices."""
    if name not in METHODS:
        raise MedmergeError(f"method: unknown merge method {name!r} (choices: {', '.join(METHODS)})")
    return METHODS[name]
