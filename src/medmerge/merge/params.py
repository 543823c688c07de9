"""The parameters model of every merge method: its declaration. Unknown keys are an error, values are
range-checked, and each searched field carries its search range (`search(low, high)`).

YAML names are the field names, except `lambda` (a Python keyword), read into `lam`.

A method's search (medmerge.merge.spaces) is read from its model: every field declared with
`json_schema_extra=search(low, high, first=…, order=…)` (or `knob(…)`) is drawn from [low, high]; its
first trial is `first`, else the field's default. Knobs are drawn in `order` (then in declaration
order); the model weights w_i ∈ [0.1, 1] are drawn at order `WEIGHTS`, unless the model sets
`search_weights = False` (every weight 1). The order is part of the search: a seeded sampler draws in
that order.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from medmerge.config.base import StrictModel

SCALE, KNOB, WEIGHTS, AFTER_WEIGHTS = 0, 1, 2, 3  # draw orders: λ, sparsity knobs, w_i, the rest


def search(low: float, high: float, *, first: float | None = None, order: int = KNOB) -> dict[str, Any]:
    """The `json_schema_extra` of a searched field: drawn from [low, high] at `order`; first trial
    `first` (None: the field's default)."""
    return {"search": {"low": low, "high": high, "first": first, "order": order}}


def knob(default: Any, description: str, low: float, high: float, *, order: int = KNOB, **bounds: Any) -> Any:
    """A searched field: its default (the first trial), description, bounds (ge=, gt=, le=, lt=) and
    search range [low, high] at `order`."""
    return Field(default, description=description, json_schema_extra=search(low, high, order=order), **bounds)


def lam_field(description: str | None = None) -> Any:
    """λ (YAML `lambda`), default 1, searched over [0.3, 1.5] before every other knob."""
    return Field(
        1.0, alias="lambda", description=description, json_schema_extra=search(0.3, 1.5, order=SCALE)
    )


class MethodParams(StrictModel):
    """Base of the parameter models: `search_weights` says whether a search draws the model weights."""

    search_weights: ClassVar[bool] = True


class NoParams(MethodParams):
    """No parameters."""


class SlerpParams(MethodParams):
    search_weights: ClassVar[bool] = False

    t: float = Field(
        ge=0.0,
        le=1.0,
        description="0 → first model, 1 → second",
        json_schema_extra=search(0.0, 1.0, first=0.5),
    )
    relative: bool = Field(False, description="interpolate task vectors τ_i and add to base_model")
    rowwise: bool = Field(False, description="one angle per row (first axis) instead of per tensor")


class LambdaParams(MethodParams):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TaskArithmeticParams(LambdaParams):
    lam: float = lam_field("scale λ of the merged task vector")
    normalize: bool = Field(False, description="divide Σ w_i τ_i by Σ w_i")


Density = Annotated[float, Field(gt=0.0, le=1.0)]


def density_field(low: float, high: float, first: float) -> Any:
    """`density` (required): one for every model or a list, one per model; searched over [low, high]."""
    description = "fraction of entries of each τ_i kept: one for every model, or a list, one per model"
    return Field(description=description, json_schema_extra=search(low, high, first=first))


def normalize_field() -> Any:
    """`normalize` of a linear (sum) combination, default false."""
    return Field(False, description="divide Σ w_i τ̂_i by Σ w_i")


class TiesParams(LambdaParams):
    density: Density | list[Density] = density_field(0.1, 1.0, first=0.5)
    lam: float = lam_field()


class DareTiesParams(TiesParams):
    seed: int = Field(0, description="seed of the random masks (with tensor name and model index)")
    rescale: bool = Field(True, description="divide survivors by their keep probability (E[τ̂] = τ)")


class DareLinearParams(DareTiesParams):
    normalize: bool = normalize_field()


class BreadcrumbsTiesParams(TiesParams):
    density: Density | list[Density] = density_field(0.1, 1.0, first=0.9)
    gamma: float = knob(0.01, "fraction of largest-|τ| outliers dropped", 0.0, 0.05, ge=0.0, lt=1.0)


class BreadcrumbsParams(BreadcrumbsTiesParams):
    normalize: bool = normalize_field()


class DellaParams(DareTiesParams):
    density: Density | list[Density] = density_field(0.2, 0.9, first=0.5)
    epsilon: float = knob(0.1, "keep probabilities span density ± epsilon", 0.0, 0.1, ge=0.0)

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        for density in self.density if isinstance(self.density, list) else [self.density]:
            if density - self.epsilon <= 0 or density + self.epsilon > 1:
                raise ValueError(f"density ± epsilon must lie in (0, 1], got {density} ± {self.epsilon}")
        return self


class DellaLinearParams(DellaParams):
    normalize: bool = normalize_field()


class ModelStockParams(MethodParams):
    search_weights: ClassVar[bool] = False

    filter_wise: bool = Field(False, description="one ratio t per row instead of per tensor")


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=1)
    tol: float = Field(1e-5, gt=0.0)


class InnerMergeParams(LambdaParams):
    """KnOTS and Core Space: the task-vector merge applied in the aligned space (`inner`), with its knobs."""

    inner: Literal["ta", "ties", "dare_linear", "dare_ties"] = Field(
        "ties", description="task-vector merge of the aligned factors (task_arithmetic, ties, dare_*)"
    )
    density: float = knob(0.5, "ties / dare_*: fraction of entries kept", 0.1, 1.0, gt=0.0, le=1.0)
    lam: float = lam_field("scale λ of the merged update")
    normalize: bool = Field(False, description="ta / dare_linear: divide Σ w_i τ̂_i by Σ w_i")
    seed: int = Field(0, description="dare_*: seed of the random masks (with tensor name and index)")
    rescale: bool = Field(True, description="dare_*: divide survivors by density")


class CoreSpaceParams(InnerMergeParams):
    inner: Literal["ta", "ties", "dare_linear", "dare_ties", "tsv", "iso_c"] = Field(
        "ties", description="merge of the r×r cores: a task-vector merge, tsv or iso_c"
    )


class TsvParams(LambdaParams):
    rank_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="fraction of each task matrix's singular directions kept (1/n)"
    )
    lam: float = lam_field("scale λ (the paper's α) of the merged update")


class IsoCParams(LambdaParams):
    lam: float = lam_field("scale λ (the paper's α) of the merged update")


class IsoCtsParams(IsoCParams):
    common_fraction: float = knob(
        0.8,
        "share of the rank given to the common subspace of Σ τ_i",
        0.5,
        0.95,
        order=AFTER_WEIGHTS,
        gt=0.0,
        le=1.0,
    )


class RegMeanParams(MethodParams):
    alpha: float = knob(
        0.9, "scale of the Gram matrices' off-diagonal entries", 0.5, 1.0, order=AFTER_WEIGHTS, ge=0.0, le=1.0
    )


class RegMeanPlusPlusParams(RegMeanParams):
    examples: int = Field(64, ge=1, description="training questions per expert run through the layers")
    batch_size: int = Field(8, ge=1, description="questions per forward pass (padding is masked out)")


class FisherParams(MethodParams):
    epsilon: float = Field(1e-8, ge=0.0, description="absolute floor added to every Fisher entry")
