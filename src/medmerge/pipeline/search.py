"""Merge hyperparameter search: a seeded Optuna sampler (TPE, CMA-ES or random), a fixed trial budget.

Each method's search space and default first trial come from its registry entry
(medmerge.merge.registry); the objective is the validation answer loss averaged over datasets
(medmerge.pipeline.scoring), lower is better. The first trial is always the method's default setting,
so a search never reports worse than the default. Methods driven by a greedy soup have no knobs: the
search runs the greedy walk of Wortsman et al. (medmerge.merge.soup) with the same scorer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medmerge.config import MergeConfig, MergeInput, SearchSettings
from medmerge.errors import MedmergeError
from medmerge.extras import require
from medmerge.merge.registry import MethodSpec, get_method
from medmerge.merge.soup import greedy_soup_merge, soup_config
from medmerge.merge.spaces import Setting, knob_names
from medmerge.pipeline.executor import Executor
from medmerge.pipeline.records import SearchTrial
from medmerge.pipeline.scoring import Scoring, score_merge


@dataclass(frozen=True)
class SearchResult:
    """A method's search: every trial in order, and the best (lowest loss; for a soup, the final one)."""

    method: str
    best: SearchTrial
    trials: list[SearchTrial] = field(default_factory=list)


def merge_config(
    method: str, base: str, experts: list[str], setting: Setting | SearchTrial, seed: int
) -> MergeConfig:
    """The MergeConfig of one setting of `method`'s parameters and weights (a method with random masks
    gets `seed`). A greedy-soup method's setting (weights 1 for members, 0 otherwise) gives the uniform
    linear merge of its members, the merge its search scored last."""
    spec = get_method(method)
    weights = setting.weights or [1.0] * len(experts)
    models = [MergeInput(path=p, weight=w) for p, w in zip(experts, weights, strict=True)]
    if spec.needs_scorer:
        request = MergeConfig(method=method, base_model=base, models=models)
        return soup_config(request, [m for m in models if m.weight > 0])
    parameters = dict(setting.parameters)
    if spec.random_masks:
        parameters["seed"] = seed
    return MergeConfig(method=method, base_model=base, models=models, parameters=parameters)


def make_sampler(settings: SearchSettings) -> Any:
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
    require("the merge search", "optuna")
    import optuna

    spec = get_method(method)
    if spec.needs_scorer:
        return _greedy(spec, base, experts, scoring, executor)
    if spec.space is None:
        raise MedmergeError(f"methods: {method} has no search space")
    space = spec.space
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(settings))
    knobs = knob_names(space, len(experts))
    default = {**{f"w{i}": 1.0 for i in range(len(experts)) if f"w{i}" in knobs}, **spec.default}
    study.enqueue_trial({k: v for k, v in default.items() if k in knobs})
    budget = settings.trials if knobs else 1
    trials: list[SearchTrial] = []
    while len(trials) < budget:
        batch = [study.ask() for _ in range(min(executor.parallelism, budget - len(trials)))]
        chosen = [space(trial, len(experts)) for trial in batch]
        configs = [merge_config(spec.name, base, experts, s, settings.seed) for s in chosen]
        scores = executor.map(score_merge, [(config, scoring) for config in configs])
        for trial, setting, score in zip(batch, chosen, scores, strict=True):
            study.tell(trial, score.loss)
            weights = setting.weights if setting.weights is not None else [1.0] * len(experts)
            trials.append(
                SearchTrial(trial.number, setting.parameters, weights, score.loss, score.per_dataset)
            )
    best = min(trials, key=lambda t: t.loss)
    return SearchResult(method=spec.name, best=best, trials=trials)


def _greedy(
    spec: MethodSpec, base: str, experts: list[str], scoring: Scoring, executor: Executor
) -> SearchResult:
    """The greedy soup of the experts, each candidate soup scored in memory; every candidate is a trial."""
    trials: list[SearchTrial] = []

    def score(candidate: MergeConfig) -> float:
        result = executor.map(score_merge, [(candidate, scoring)])[0]
        members = [m.path for m in candidate.models]
        weights = [1.0 if p in members else 0.0 for p in experts]
        trials.append(SearchTrial(len(trials), {}, weights, result.loss, result.per_dataset, members))
        return -result.loss  # the soup maximises

    request = MergeConfig(method=spec.name, base_model=base, models=experts)
    soup = greedy_soup_merge(request, score)
    members = [m.path for m in soup.config.models]
    best = next(t for t in reversed(trials) if t.members == members and -t.loss == soup.walk.score)
    return SearchResult(method=spec.name, best=best, trials=trials)
