"""The parameters model of every merge method: unknown keys are an error, values are range-checked.

YAML names are the field names, except `lambda` (a Python keyword), read into `lam`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from medmerge.config.base import StrictModel


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


Density = Annotated[float, Field(gt=0.0, le=1.0)]


class TiesParams(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    density: Density | list[Density] = Field(
        description="fraction of entries of each τ_i kept: one for every model, or a list, one per model"
    )
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
        for density in self.density if isinstance(self.density, list) else [self.density]:
            if density - self.epsilon <= 0 or density + self.epsilon > 1:
                raise ValueError(f"density ± epsilon must lie in (0, 1], got {density} ± {self.epsilon}")
        return self


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide Σ w_i τ̂_i by Σ w_i")


class ModelStockParams(StrictModel):
    filter_wise: bool = Field(False, description="one ratio t per row instead of per tensor")


class KarcherParams(StrictModel):
    max_iter: int = Field(10, ge=1)
    tol: float = Field(1e-5, gt=0.0)


class InnerMergeParams(StrictModel):
    """KnOTS and Core Space: the task-vector merge applied in the aligned space (`inner`), with its knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    inner: Literal["ta", "ties", "dare_linear", "dare_ties"] = Field(
        "ties", description="task-vector merge of the aligned factors (task_arithmetic, ties, dare_*)"
    )
    density: float = Field(0.5, gt=0.0, le=1.0, description="ties / dare_*: fraction of entries kept")
    lam: float = Field(1.0, alias="lambda", description="scale λ of the merged update")
    normalize: bool = Field(False, description="ta / dare_linear: divide Σ w_i τ̂_i by Σ w_i")
    seed: int = Field(0, description="dare_*: seed of the random masks (with tensor name and index)")
    rescale: bool = Field(True, description="dare_*: divide survivors by density")


class CoreSpaceParams(InnerMergeParams):
    inner: Literal["ta", "ties", "dare_linear", "dare_ties", "tsv", "iso_c"] = Field(
        "ties", description="merge of the r×r cores: a task-vector merge, tsv or iso_c"
    )


class TsvParams(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    rank_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="fraction of each task matrix's singular directions kept (1/n)"
    )
    lam: float = Field(1.0, alias="lambda", description="scale λ (the paper's α) of the merged update")


class IsoCParams(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    lam: float = Field(1.0, alias="lambda", description="scale λ (the paper's α) of the merged update")


class IsoCtsParams(IsoCParams):
    common_fraction: float = Field(
        0.8, gt=0.0, le=1.0, description="share of the rank given to the common subspace of Σ τ_i"
    )


class RegMeanParams(StrictModel):
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="scale of the Gram matrices' off-diagonal entries")


class RegMeanPlusPlusParams(RegMeanParams):
    examples: int = Field(64, ge=1, description="training questions per expert run through the layers")
    batch_size: int = Field(8, ge=1, description="questions per forward pass (padding is masked out)")


class FisherParams(StrictModel):
    epsilon: float = Field(1e-8, ge=0.0, description="absolute floor added to every Fisher entry")
