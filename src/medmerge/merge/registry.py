"""The one registry of merge methods: what a method IS beyond its parameters lives in its `MethodSpec`.

Every method name medmerge accepts is a key of `METHODS`; `get_method(name)` raises a one-line error
listing the choices. A method is declared by its parameters model (medmerge.merge.params: each field's
default, bounds and search range; the search space and the search's first trial are read from it) and
by its entry here: the tensor function, the driver that runs it, and its input contract (`check`: the
base model, the number of models, what it reads beyond θ: site statistics, LoRA factors, the experts'
training data, `data`, which a federation must refuse). Adding a method = a parameters model + a tensor
function (medmerge.merge.methods, .spectral or .data_aware) + one entry here + its section in
docs/merging.md (tests/merge/test_registry.py checks them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from medmerge.config.base import StrictModel, format_validation_error
from medmerge.errors import MedmergeError
from medmerge.merge import data_aware, methods, regmean_pp, spectral
from medmerge.merge.methods import Merged, TaskVectorMerge
from medmerge.merge.params import (
    BreadcrumbsParams,
    BreadcrumbsTiesParams,
    CoreSpaceParams,
    DareLinearParams,
    DareTiesParams,
    DellaLinearParams,
    DellaParams,
    FisherParams,
    InnerMergeParams,
    IsoCParams,
    IsoCtsParams,
    KarcherParams,
    MethodParams,
    ModelStockParams,
    NoParams,
    RegMeanParams,
    RegMeanPlusPlusParams,
    SlerpParams,
    TaskArithmeticParams,
    TiesParams,
    TsvParams,
)
from medmerge.merge.spaces import Space, first_setting, space_of
from medmerge.merge.statistics import ExpertData

TensorFn = Callable[..., Merged]
# (name, θ_base or None, θ_i list, w_i list, params) → Merged; methods that need statistics or LoRA
# factors also get a sixth argument, the tensor's medmerge.merge.methods.Extras
Driver = Literal["per_tensor", "greedy_soup"]
# per_tensor: the streaming engine calls `merge` once per tensor name;
# greedy_soup: an evaluation-driven walk over uniform linear merges (needs a scorer; merge.soup)
BaseUse = Literal["required", "optional", "unused"]
Family = Literal["data_free", "spectral", "data_aware"]
# data_free: weight arithmetic on θ and τ alone (mergekit's methods, soups); spectral: LoRA-native and
# spectral methods (SVD of the task matrices, no data); data_aware: weighted by statistics of site data


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    params: type[MethodParams]  # the declaration: defaults, bounds, search ranges (medmerge.merge.params)
    driver: Driver = "per_tensor"
    merge: TensorFn | None = None  # per_tensor only; overwrites its `thetas` only with overwrites_inputs
    base: BaseUse = "unused"  # required: θ_base enters the math; optional: when `base_switch` is true
    base_switch: str | None = None  # the bool parameter that makes an optional base required
    min_models: int = 1
    max_models: int | None = None
    # the stats carry ‖τ_i‖ for each model: finite exactly when θ_i and θ_base are (the engine then skips
    # its separate NaN/Inf pass over the inputs)
    task_vectors: bool = False
    # every NaN/Inf input entry makes its output entry NaN/Inf (linear: Σ w_i θ_i), so the output's check
    # stands for the inputs' (the engine re-reads them only to name the culprit)
    output_shows_inputs: bool = False
    # the tensor function computes in its `thetas`' storage (τ_i = θ_i − θ_base in place), so the engine
    # reads them as private copies; others get memory-mapped inputs (medmerge.merge.tensors), where a
    # write would copy each page on its own fault
    overwrites_inputs: bool = False
    nonzero_weight_sum: bool = False  # the weights must not sum to 0 (they divide the result)
    # kinds of site statistics every input must hold (statistics.safetensors: gram, fisher); the engine
    # hands them over per tensor in Extras.statistics
    needs_statistics: frozenset[str] = frozenset()
    needs_factors: bool = False  # every input must be a LoRA adapter; Extras.factors holds its (B′, A′)
    # the merge reads the experts' TRAINING DATA (their questions run through the models at merge time),
    # not only weights and statistics a site may share: the engine runs `data.run` over it, which hands
    # the tensor function the statistics it takes (regmean_plus_plus: medmerge.merge.regmean_pp.DATA).
    # A federation, which never sees the sites' data, must refuse such methods.
    data: ExpertData | None = None
    family: Family = "data_free"  # what the verdict compares: each family's best against the data-free best

    def __post_init__(self) -> None:
        if (self.driver == "per_tensor") != (self.merge is not None):
            raise ValueError(f"{self.name}: a per_tensor method needs a tensor function, others none")
        if (self.base == "optional") != (self.base_switch is not None):
            raise ValueError(f"{self.name}: an optional base needs base_switch, and only it")
        if self.data is not None and (
            self.driver != "per_tensor" or self.needs_statistics or self.needs_factors
        ):
            raise ValueError(f"{self.name}: needs_data (data) is a per_tensor method's only input beyond θ")
        self.params.model_validate(self.default)

    @property
    def needs_data(self) -> bool:
        """Whether the merge reads the experts' training data (`data`)."""
        return self.data is not None

    @property
    def consensus(self) -> bool:
        """TIES sign election and disjoint mean (a task-vector merge that elects signs)."""
        return isinstance(self.merge, TaskVectorMerge) and self.merge.consensus

    @property
    def random_masks(self) -> bool:
        """Draws random masks from its `seed` parameter (a search fixes it)."""
        return "seed" in self.params.model_fields

    @property
    def space(self) -> Space | None:
        """The search space its parameters model declares; None for a driver that searches on its own."""
        return space_of(self.params) if self.driver == "per_tensor" else None

    @property
    def default(self) -> dict[str, Any]:
        """The parameters of a search's first trial (YAML names), from the parameters model."""
        return first_setting(self.params)

    @property
    def needs_extras(self) -> bool:
        """Whether the tensor function takes the per-tensor Extras (statistics or LoRA factors)."""
        return bool(self.needs_statistics) or self.needs_factors

    @property
    def needs_scorer(self) -> bool:
        """Whether merging needs a scorer (model merge config → score, higher is better)."""
        return self.driver == "greedy_soup"

    def uses_base(self, params: StrictModel) -> bool:
        """Whether θ_base enters the math with these (validated) parameters."""
        if self.base == "optional":
            return bool(getattr(params, self.base_switch or ""))
        return self.base == "required"

    def check(self, has_base: bool, weights: Sequence[float], parameters: dict[str, Any]) -> StrictModel:
        """The validated parameters, or a ValueError naming what the inputs of this method lack."""
        try:
            params = self.params.model_validate(parameters)
        except ValidationError as exc:
            raise ValueError(format_validation_error(f"parameters of {self.name}", exc)) from None
        n = len(weights)
        for name, value in params:  # a list-valued parameter holds one value per model
            if isinstance(value, list) and len(value) != n:
                raise ValueError(f"parameters of {self.name}: {name} has {len(value)} values for {n} models")
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            wanted = self.min_models if self.max_models == self.min_models else f"at least {self.min_models}"
            raise ValueError(f"{self.name} needs {wanted} models, got {n}")
        if self.uses_base(params) and not has_base:
            raise ValueError(f"{self.name} needs base_model (task vectors are θ_i − θ_base)")
        if self.nonzero_weight_sum and abs(sum(weights)) < 1e-12:
            raise ValueError(f"{self.name}: the model weights sum to 0")
        return params


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


def _task_vector(name: str, params: type[MethodParams], merge: TaskVectorMerge, summary: str) -> MethodSpec:
    """A setting of generalized_task_arithmetic: base required, ‖τ_i‖ in the stats."""
    return MethodSpec(name, summary, params, merge=merge, base="required", task_vectors=True)


def _spectral(
    name: str, params: type[MethodParams], merge: TensorFn, summary: str, **more: Any
) -> MethodSpec:
    """A spectral merge of the τ_i (medmerge.merge.spectral): base required, computed in its inputs."""
    return MethodSpec(
        name, summary, params, merge=merge, base="required", overwrites_inputs=True, family="spectral", **more
    )


def _data_aware(
    name: str, params: type[MethodParams], merge: TensorFn, summary: str, **more: Any
) -> MethodSpec:
    """A merge weighted by what the sites' data says (medmerge.merge.data_aware)."""
    return MethodSpec(
        name, summary, params, merge=merge, family="data_aware", nonzero_weight_sum=True, **more
    )


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in [
        MethodSpec(
            "linear",
            "Σ w_i θ_i / Σ w_i (model soup)",
            NoParams,
            merge=_linear,
            output_shows_inputs=True,
            nonzero_weight_sum=True,
        ),
        MethodSpec("soup_greedy", "greedy soup by validation score", NoParams, driver="greedy_soup"),
        MethodSpec(
            "slerp",
            "spherical interpolation of two models",
            SlerpParams,
            merge=_slerp,
            base="optional",
            base_switch="relative",
            min_models=2,
            max_models=2,
        ),
        _task_vector(
            "task_arithmetic", TaskArithmeticParams, methods.TASK_ARITHMETIC, "θ_base + λ Σ w_i τ_i"
        ),
        _task_vector("ties", TiesParams, methods.TIES, "trim, elect sign, disjoint mean"),
        _task_vector("dare_linear", DareLinearParams, methods.DARE_LINEAR, "random drop + rescale, sum"),
        _task_vector("dare_ties", DareTiesParams, methods.DARE_TIES, "random drop + TIES"),
        _task_vector("breadcrumbs", BreadcrumbsParams, methods.BREADCRUMBS, "drop tails, sum"),
        _task_vector(
            "breadcrumbs_ties", BreadcrumbsTiesParams, methods.BREADCRUMBS_TIES, "drop tails + TIES"
        ),
        _task_vector("della", DellaParams, methods.DELLA, "ranked drop + TIES"),
        _task_vector("della_linear", DellaLinearParams, methods.DELLA_LINEAR, "ranked drop, sum"),
        MethodSpec(
            "model_stock",
            "ratio from task-vector angle",
            ModelStockParams,
            merge=_model_stock,
            base="required",
            task_vectors=True,  # its stats carry ‖τ_i‖
            min_models=2,
        ),
        MethodSpec("karcher", "Riemannian mean on the sphere", KarcherParams, merge=_karcher),
        _spectral(
            "knots", InnerMergeParams, spectral.knots, "SVD-aligned task updates, merged by ta/ties/dare"
        ),
        _spectral(
            "tsv",
            TsvParams,
            spectral.tsv,
            "low-rank task matrices, decorrelated (TSV-M)",
            nonzero_weight_sum=True,
        ),
        _spectral(
            "iso_c", IsoCParams, spectral.iso_c, "isotropic spectrum of Σ τ_i", nonzero_weight_sum=True
        ),
        _spectral(
            "iso_cts",
            IsoCtsParams,
            spectral.iso_cts,
            "isotropic common + task-specific subspaces",
            nonzero_weight_sum=True,
        ),
        _spectral(
            "core_space",
            CoreSpaceParams,
            spectral.core_space,
            "LoRA updates merged in their shared r×r core",
            needs_factors=True,
        ),
        _data_aware(
            "regmean",
            RegMeanParams,
            data_aware.regmean,
            "least squares on the sites' layer inputs (Gram)",
            needs_statistics=frozenset({"gram"}),
        ),
        _data_aware(
            "regmean_plus_plus",
            RegMeanPlusPlusParams,
            data_aware.regmean,
            "RegMean block by block on the merged model's own inputs (reads the training data)",
            data=regmean_pp.DATA,
        ),
        _data_aware(
            "fisher",
            FisherParams,
            data_aware.fisher,
            "Fisher-weighted average (diagonal Fisher)",
            needs_statistics=frozenset({"fisher"}),
        ),
    ]
}


def get_method(name: str) -> MethodSpec:
    """The spec of method `name`, or a one-line error listing the choices."""
    if name not in METHODS:
        raise MedmergeError(f"method: unknown merge method {name!r} (choices: {', '.join(METHODS)})")
    return METHODS[name]
