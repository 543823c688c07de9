"""Merge hyperparameter search: a seeded Optuna sampler (TPE, CMA-ES or random), a fixed trial budget.

Each method has a search space over its knobs (weights w_i, λ, density, t, …); the objective is the
validation answer loss averaged over datasets (medmerge.pipeline.scoring), lower is better. The first
trial is always the method's default setting, so a search never reports worse than the default.
Greedy soup has no knobs: it is the greedy walk of Wortsman et al. with the same scorer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medmerge.config import MergeConfig, SearchSettings
from medmerge.errors import MedmergeError
from medmerge.pipeline.executor import Executor
from medmerge.pipeline.scoring import Scoring, score_merge

Space = Callable[[Any, int], dict[str, Any]]  # (optuna trial, n models) → {"parameters": …, "weights": …}


def _weights(trial: Any, n: int) -> list[float]:
    return [trial.suggest_float(f"w{i}", 0.1, 1.0) for i in range(n)]


def _task_vector_space(*extra: str) -> Space:
    """density ∈ [0.1, 1], λ ∈ [0.3, 1.5], w_i ∈ [0.1, 1], plus method-specific knobs."""

    def space(trial: Any, n: int) -> dict[str, Any]:
        parameters: dict[str, Any] = {"lambda": trial.suggest_float("lambda", 0.3, 1.5)}
        if "density" in extra:
            low = 0.2 if "epsilon" in extra else 0.1
            parameters["density"] = trial.suggest_float("density", low, 0.9 if "epsilon" in extra else 1.0)
        if "gamma" in extra:
            parameters["gamma"] = trial.suggest_float("gamma", 0.0, 0.05)
        if "epsilon" in extra:
            parameters["epsilon"] = trial.suggest_float("epsilon", 0.0, 0.1)
        return {"parameters": parameters, "weights": _weights(trial, n)}

    return space


SPACES: dict[str, Space | None] = {
    "linear": lambda trial, n: {"parameters": {}, "weights": _weights(trial, n)},
    "soup_greedy": None,
    "slerp": lambda trial, n: {"parameters": {"t": trial.suggest_float("t", 0.0, 1.0)}, "weights": [1.0] * n},
    "task_arithmetic": _task_vector_space(),
    "ties": _task_vector_space("density"),
    "dare_linear": _task_vector_space("density"),
    "dare_ties": _task_vector_space("density"),
    "breadcrumbs": _task_vector_space("density", "gamma"),
    "breadcrumbs_ties": _task_vector_space("density", "gamma"),
    "della": _task_vector_space("density", "epsilon"),
    "della_linear": _task_vector_space("density", "epsilon"),
    "model_stock": lambda trial, n: {"parameters": {}, "weights": [1.0] * n},
    "karcher": lambda trial, n: {"parameters": {}, "weights": _weights(trial, n)},
}
DEFAULTS: dict[str, dict[str, Any]] = {  # the first trial of each search: the usual default setting
    "linear": {"parameters": {}},
    "slerp": {"parameters": {"t": 0.5}},
    "task_arithmetic": {"parameters": {"lambda": 1.0}},
    "ties": {"parameters": {"density": 0.5, "lambda": 1.0}},
    "dare_linear": {"parameters": {"density": 0.5, "lambda": 1.0}},
    "dare_ties": {"parameters": {"density": 0.5, "lambda": 1.0}},
    "breadcrumbs": {"parameters": {"density": 0.9, "gamma": 0.01, "lambda": 1.0}},
    "breadcrumbs_ties": {"parameters": {"density": 0.9, "gamma": 0.01, "lambda": 1.0}},
    "della": {"parameters": {"density": 0.5, "epsilon": 0.1, "lambda": 1.0}},
    "della_linear": {"parameters": {"density": 0.5, "epsilon": 0.1, "lambda": 1.0}},
    "model_stock": {"parameters": {}},
    "karcher": {"parameters": {}},
}
_FIXED_SEED = {"dare_linear", "dare_ties", "della", "della_linear"}  # methods with random masks


@dataclass
class SearchResult:
    method: str
    best: dict[str, Any]  # {"parameters", "weights", "loss", "per_dataset"}
    trials: list[dict[str, Any]] = field(default_factory=list)


def merge_config(
    method: str, base: str, experts: list[str], choice: dict[str, Any], seed: int
) -> MergeConfig:
    """The MergeConfig of one trial's choice of parameters and weights."""
    parameters = dict(choice["parameters"])
    if method in _FIXED_SEED:
        parameters["seed"] = seed
    weights = choice.get("weights") or [1.0] * len(experts)
    return MergeConfig(
        method=method,
        base_model=base,
        models=[{"path": p, "weight": w} for p, w in zip(experts, weights, strict=True)],
        parameters=parameters,
    )


def _sampler(settings: SearchSettings) -> Any:
    import optuna

    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=settings.seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    try:
        import cmaes  # noqa: F401  (optuna's CMA-ES sampler needs it)
    except ImportError:
        raise MedmergeError("search.sampler: cmaes needs the `cmaes` package (pip install cmaes)") from None
    return optuna.samplers.CmaEsSampler(seed=settings.seed, warn_independent_sampling=False)


def search_method(
    method: str,
    base: str,
    experts: list[str],
    settings: SearchSettings,
    scoring: Scoring,
    executor: Executor,
) -> SearchResult:
    """Search `method`'s knobs; `executor` scores a batch of trials (in parallel on Ray)."""
    import optuna

    if method == "soup_greedy":
        return _greedy(base, experts, scoring, executor, settings.seed)
    space = SPACES[method]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=_sampler(settings))
    knobs = _knob_names(space, len(experts))
    default = {
        **{f"w{i}": 1.0 for i in range(len(experts)) if f"w{i}" in knobs},
        **DEFAULTS[method]["parameters"],
    }
    study.enqueue_trial({k: v for k, v in default.items() if k in knobs})
    budget = settings.trials if knobs else 1
    results: list[dict[str, Any]] = []
    while len(results) < budget:
        batch = [study.ask() for _ in range(min(executor.parallelism, budget - len(results)))]
        choices = [space(trial, len(experts)) for trial in batch]
        configs = [merge_config(method, base, experts, c, settings.seed) for c in choices]
        scores = executor.map(score_merge, [(config, scoring) for config in configs])
        for trial, choice, score in zip(batch, choices, scores, strict=True):
            study.tell(trial, score["loss"])
            results.append({"trial": trial.number, **choice, **score})
    best = min(results, key=lambda r: r["loss"])
    return SearchResult(method=method, best=best, trials=results)


def _knob_names(space: Space, n: int) -> list[str]:
    """The names a search space suggests (recorded by a stand-in trial that answers `low`)."""
    names: list[str] = []

    class Recorder:
        def suggest_float(self, name: str, low: float, high: float) -> float:
            names.append(name)
            return low

    space(Recorder(), n)
    return names


def _greedy(base: str, experts: list[str], scoring: Scoring, executor: Executor, seed: int) -> SearchResult:
    from medmerge.merge.soup import greedy_soup

    trials: list[dict[str, Any]] = []

    def score(members: list[str]) -> float:
        config = merge_config("linear", base, members, {"parameters": {}}, seed)
        result = executor.map(score_merge, [(config, scoring)])[0]
        trials.append({"trial": len(trials), "members": members, **result})
        return -result["loss"]  # greedy_soup maximises

    soup = greedy_soup(experts, score)
    members = [experts[i] for i in soup.members]
    weights = [1.0 if p in members else 0.0 for p in experts]
    best = next(t for t in reversed(trials) if t["members"] == members and -t["loss"] == soup.score)
    return SearchResult(
        method="soup_greedy",
        best={"parameters": {}, "weights": weights, "loss": best["loss"], "per_dataset": best["per_dataset"]},
        trials=trials,
    )
