"""`medmerge run`'s merge search: the one search loop of medmerge.merge.search, scoring each recipe in
memory (medmerge.pipeline.scoring; trials in parallel on Ray), recorded as `SearchTrial`s.

The objective is the validation answer loss averaged over datasets, lower is better; the first trial is
the method's default setting; greedy-soup methods run the greedy walk (medmerge.merge.search).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medmerge.config import MergeConfig, SearchSettings
from medmerge.merge.recipe import Recipe
from medmerge.merge.registry import get_method
from medmerge.merge.search import Scored, Trial, search
from medmerge.merge.spaces import Setting
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
    """The MergeConfig of one setting of `method`'s parameters and weights over the expert folders
    (medmerge.merge.recipe.Recipe.merge_config)."""
    weights = setting.weights or [1.0] * len(experts)
    recipe = Recipe(method=method, parameters=setting.parameters, weights=weights, seed=seed, experts=experts)
    return recipe.merge_config(base)


def search_method(
    method: str,
    base: str,
    experts: list[str],
    settings: SearchSettings,
    scoring: Scoring,
    executor: Executor,
) -> SearchResult:
    """Search `method`'s knobs; `executor` scores a batch of trials (in parallel on Ray)."""

    def score(recipes: list[Recipe], first: int) -> list[Scored]:
        configs = [recipe.merge_config(base) for recipe in recipes]
        results = executor.map(score_merge, [(config, scoring) for config in configs])
        return [Scored(r.loss, r.per_dataset) for r in results]

    result = search(method, experts, settings, score, parallelism=executor.parallelism)
    soup = get_method(method).needs_scorer
    trials = [_search_trial(t, experts, soup) for t in result.trials]
    return SearchResult(method=result.method, best=trials[result.best.number], trials=trials)


def _search_trial(trial: Trial, experts: list[str], soup: bool) -> SearchTrial:
    """A trial as `medmerge run` records it (a soup's candidate: weight 1 for members, 0 otherwise)."""
    recipe = trial.recipe
    if soup:
        weights = [1.0 if e in recipe.experts else 0.0 for e in experts]
        details = trial.details or {}
        return SearchTrial(trial.number, {}, weights, trial.loss, details, list(recipe.experts))
    return SearchTrial(trial.number, dict(recipe.parameters), list(recipe.weights), trial.loss, trial.details)
