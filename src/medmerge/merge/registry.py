"""The one registry of merge methods: everything medmerge knows about a method lives in its `MethodSpec`.

Every method name medmerge accepts is a key of `METHODS`; `get_method(name)` raises a one-line error
listing the choices. A spec owns the method's parameters model (unknown keys are an error) and its
input contract (`check`), the driver that runs it, its tensor function, and its search space with the
default first trial, and what it reads beyond θ (site statistics, LoRA factors, the experts' training
data: `needs_data`, which a federation must refuse). Adding a method = one
entry here + its tensor function (medmerge.merge.methods, .spectral or .data_aware) + its section in
docs/merging.md (tests/merge/test_registry.py checks all three).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from medmerge.config.base import StrictModel, format_validation_error
from medmerge.errors import MedmergeError
from medmerge.merge import data_aware, methods, spaces, spectral
from medmerge.merge.methods import Merged
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
    ModelStockParams,
    NoParams,
    RegMeanParams,
    RegMeanPlusPlusParams,
    SlerpParams,
    TaskArithmeticParams,
    TiesParams,
    TsvParams,
)
from medmerge.merge.spaces import Space

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
    params: type[StrictModel]
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
    consensus: bool = False  # TIES sign election and disjoint mean
    random_masks: bool = False  # draws random masks from its `seed` parameter (a search fixes it)
    nonzero_weight_sum: bool = False  # the weights must not sum to 0 (they divide the result)
    space: Space | None = None  # search space of the knobs; None: nothing to search
    default: dict[str, Any] = field(default_factory=dict)  # parameters of a search's first trial
    # kinds of site statistics every input must hold (statistics.safetensors: gram, fisher); the engine
    # hands them over per tensor in Extras.statistics
    needs_statistics: frozenset[str] = frozenset()
    needs_factors: bool = False  # every input must be a LoRA adapter; Extras.factors holds its (B′, A′)
    # the merge reads the experts' TRAINING DATA (their questions run through the models at merge time),
    # not only weights and statistics a site may share: the engine runs the method's pass over it and
    # hands its tensor function the Grams it takes in Extras.statistics (regmean_plus_plus:
    # medmerge.merge.regmean_pp). A federation, which never sees the sites' data, must refuse such methods.
    needs_data: bool = False
    family: Family = "data_free"  # what the verdict compares: each family's best against the data-free best

    def __post_init__(self) -> None:
        if (self.driver == "per_tensor") != (self.merge is not None):
            raise ValueError(f"{self.name}: a per_tensor method needs a tensor function, others none")
        if (self.base == "optional") != (self.base_switch is not None):
            raise ValueError(f"{self.name}: an optional base needs base_switch, and only it")
        if self.random_masks != ("seed" in self.params.model_fields):
            raise ValueError(f"{self.name}: random_masks goes with a `seed` parameter")
        if self.needs_data and (self.driver != "per_tensor" or self.needs_statistics or self.needs_factors):
            raise ValueError(f"{self.name}: needs_data is a per_tensor method's only input beyond θ")
        self.params.model_validate(self.default)

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


def _task_vector_method(
    name: str,
    params: type[StrictModel],
    sparsifier: methods.Sparsifier,
    consensus: bool,
    summary: str,
    knobs: tuple[str, ...],
    default: dict[str, Any],
) -> MethodSpec:
    """A setting of generalized_task_arithmetic: base required, ‖τ_i‖ in the stats."""
    return MethodSpec(
        name,
        summary,
        params,
        merge=_gta(sparsifier, consensus),
        base="required",
        task_vectors=True,
        consensus=consensus,
        random_masks=sparsifier in ("bernoulli", "della"),
        space=spaces.task_vector_space(*knobs),
        default=default,
    )


def _spectral_method(
    name: str, params: type[StrictModel], merge: TensorFn, summary: str, **knobs: tuple[float, float, float]
) -> MethodSpec:
    """A spectral merge of the τ_i (medmerge.merge.spectral): base required, λ and the weights searched,
    plus `knobs` (name → (low, high, first trial))."""
    return MethodSpec(
        name,
        summary,
        params,
        merge=merge,
        base="required",
        overwrites_inputs=True,
        nonzero_weight_sum=True,
        space=spaces.with_knobs(spaces.task_vector_space(), **{k: v[:2] for k, v in knobs.items()}),
        default={"lambda": 1.0, **{k: v[2] for k, v in knobs.items()}},
        family="spectral",
    )


_TRIM = {"density": 0.5, "lambda": 1.0}
_INNER = {"inner": "ties", "density": 0.5, "lambda": 1.0}
_BREADCRUMBS = {"density": 0.9, "gamma": 0.01, "lambda": 1.0}
_DELLA = {"density": 0.5, "epsilon": 0.1, "lambda": 1.0}
_ALPHA = spaces.with_knobs(spaces.weights_only, alpha=(0.5, 1.0))  # RegMean's and RegMean++'s space

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
            space=spaces.weights_only,
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
            space=spaces.interpolation,
            default={"t": 0.5},
        ),
        _task_vector_method(
            "task_arithmetic",
            TaskArithmeticParams,
            "none",
            False,
            "θ_base + λ Σ w_i τ_i",
            (),
            {"lambda": 1.0},
        ),
        _task_vector_method(
            "ties", TiesParams, "magnitude", True, "trim, elect sign, disjoint mean", ("density",), _TRIM
        ),
        _task_vector_method(
            "dare_linear",
            DareLinearParams,
            "bernoulli",
            False,
            "random drop + rescale, sum",
            ("density",),
            _TRIM,
        ),
        _task_vector_method(
            "dare_ties", DareTiesParams, "bernoulli", True, "random drop + TIES", ("density",), _TRIM
        ),
        _task_vector_method(
            "breadcrumbs",
            BreadcrumbsParams,
            "breadcrumbs",
            False,
            "drop tails, sum",
            ("density", "gamma"),
            _BREADCRUMBS,
        ),
        _task_vector_method(
            "breadcrumbs_ties",
            BreadcrumbsTiesParams,
            "breadcrumbs",
            True,
            "drop tails + TIES",
            ("density", "gamma"),
            _BREADCRUMBS,
        ),
        _task_vector_method(
            "della", DellaParams, "della", True, "ranked drop + TIES", ("density", "epsilon"), _DELLA
        ),
        _task_vector_method(
            "della_linear",
            DellaLinearParams,
            "della",
            False,
            "ranked drop, sum",
            ("density", "epsilon"),
            _DELLA,
        ),
        MethodSpec(
            "model_stock",
            "ratio from task-vector angle",
            ModelStockParams,
            merge=_model_stock,
            base="required",
            task_vectors=True,  # its stats carry ‖τ_i‖
            min_models=2,
            space=spaces.unit_weights,
        ),
        MethodSpec(
            "karcher",
            "Riemannian mean on the sphere",
            KarcherParams,
            merge=_karcher,
            space=spaces.weights_only,
        ),
        MethodSpec(
            "knots",
            "SVD-aligned task updates, merged by ta/ties/dare",
            InnerMergeParams,
            merge=spectral.knots,
            base="required",
            overwrites_inputs=True,
            random_masks=True,
            space=spaces.task_vector_space("density"),
            default=_INNER,
            family="spectral",
        ),
        _spectral_method("tsv", TsvParams, spectral.tsv, "low-rank task matrices, decorrelated (TSV-M)"),
        _spectral_method("iso_c", IsoCParams, spectral.iso_c, "isotropic spectrum of Σ τ_i"),
        _spectral_method(
            "iso_cts",
            IsoCtsParams,
            spectral.iso_cts,
            "isotropic common + task-specific subspaces",
            common_fraction=(0.5, 0.95, 0.8),
        ),
        MethodSpec(
            "core_space",
            "LoRA updates merged in their shared r×r core",
            CoreSpaceParams,
            merge=spectral.core_space,
            base="required",
            overwrites_inputs=True,
            needs_factors=True,
            random_masks=True,
            space=spaces.task_vector_space("density"),
            default=_INNER,
            family="spectral",
        ),
        MethodSpec(
            "regmean",
            "least squares on the sites' layer inputs (Gram)",
            RegMeanParams,
            merge=data_aware.regmean,
            needs_statistics=frozenset({"gram"}),
            family="data_aware",
            nonzero_weight_sum=True,
            space=_ALPHA,
            default={"alpha": 0.9},
        ),
        MethodSpec(
            "regmean_plus_plus",
            "RegMean block by block on the merged model's own inputs (reads the training data)",
            RegMeanPlusPlusParams,
            merge=data_aware.regmean,
            family="data_aware",
            needs_data=True,
            nonzero_weight_sum=True,
            space=_ALPHA,
            default={"alpha": 0.9},
        ),
        MethodSpec(
            "fisher",
            "Fisher-weighted average (diagonal Fisher)",
            FisherParams,
            merge=data_aware.fisher,
            needs_statistics=frozenset({"fisher"}),
            family="data_aware",
            nonzero_weight_sum=True,
            space=spaces.weights_only,
        ),
    ]
}


def get_method(name: str) -> MethodSpec:
    """The spec of method `name`, or a one-line error listing the choices."""
    if name not in METHODS:
        raise MedmergeError(f"method: unknown merge method {name!r} (choices: {', '.join(METHODS)})")
    return METHODS[name]
