"""The one merge search loop (medmerge.merge.search) with a scorer of its own: the default first trial,
a non-finite loss is a failed trial that never wins, a study in RDB storage resumes (finished trials
reused, never scored again; the trial in flight proposed again), and the greedy-soup branch."""

from __future__ import annotations

import math

import pytest

from medmerge.config import SearchSettings
from medmerge.errors import MedmergeError
from medmerge.merge.recipe import Recipe
from medmerge.merge.search import Scored, search

EXPERTS = ["north", "south"]


def bowl(recipe: Recipe) -> float:
    """A loss with its minimum at λ = 0.8, w = (0.5, 0.5)."""
    lam = recipe.parameters.get("lambda", 1.0)
    return (lam - 0.8) ** 2 + sum((w - 0.5) ** 2 for w in recipe.weights)


class Counting:
    def __init__(self, loss=bowl, die_at: int | None = None) -> None:
        self.scored: list[Recipe] = []
        self.firsts: list[int] = []  # the trial number of each call's first recipe
        self.loss, self.die_at = loss, die_at

    def __call__(self, recipes: list[Recipe], first: int) -> list[Scored]:
        self.firsts.append(first)
        out = []
        for recipe in recipes:
            if self.die_at is not None and len(self.scored) == self.die_at:
                raise KeyboardInterrupt("the process dies mid-trial")
            self.scored.append(recipe)
            out.append(Scored(self.loss(recipe), {"n": len(self.scored)}))
        return out


def test_default_first_then_the_best():
    settings = SearchSettings(trials=5, seed=3)
    scorer = Counting()
    result = search("task_arithmetic", EXPERTS, settings, scorer)
    assert len(result.trials) == 5 and len(scorer.scored) == 5 and scorer.firsts == [0, 1, 2, 3, 4]
    first = result.trials[0].recipe
    assert first.parameters == {"lambda": 1.0} and first.weights == [1.0, 1.0] and first.experts == EXPERTS
    assert result.best.loss == min(t.loss for t in result.trials)
    again = search("task_arithmetic", EXPERTS, settings, Counting())
    assert [t.recipe for t in again.trials] == [t.recipe for t in result.trials]  # seeded


def test_a_nan_trial_never_wins():
    def loss(recipe: Recipe) -> float:
        return math.nan if recipe.weights == [1.0, 1.0] else 5.0 + bowl(recipe)

    result = search("task_arithmetic", EXPERTS, SearchSettings(trials=3), Counting(loss))
    assert result.trials[0].failed and result.trials[0].loss == math.inf
    assert result.best is not result.trials[0] and math.isfinite(result.best.loss)
    assert result.trials[0].record()["loss"] is None
    with pytest.raises(MedmergeError, match="every trial failed"):
        search("task_arithmetic", EXPERTS, SearchSettings(trials=2), Counting(lambda r: math.nan))


def test_a_stored_study_resumes(tmp_path):
    import optuna

    storage, settings = f"sqlite:///{tmp_path / 'search.db'}", SearchSettings(trials=5, seed=1)
    first = Counting(die_at=3)
    with pytest.raises(KeyboardInterrupt):
        search("task_arithmetic", EXPERTS, settings, first, storage=storage, study_name="run-1")
    assert len(first.scored) == 3
    study = optuna.load_study(study_name="run-1", storage=storage)
    (in_flight,) = [t for t in study.trials if t.state.name == "RUNNING"]

    second = Counting()
    result = search("task_arithmetic", EXPERTS, settings, second, storage=storage, study_name="run-1")
    assert len(result.trials) == 5 and len(second.scored) == 2  # the three finished ones are not rescored
    assert first.firsts == [0, 1, 2, 3] and second.firsts == [3, 4]
    assert [t.recipe for t in result.trials[:3]] == first.scored
    assert [t.details["n"] for t in result.trials] == [1, 2, 3, 1, 2]
    assert second.scored[0].parameters["lambda"] == in_flight.params["lambda"]  # proposed again
    assert len({tuple(t.recipe.weights) for t in result.trials}) == 5  # no trial drawn twice
    third = Counting()
    again = search("task_arithmetic", EXPERTS, settings, third, storage=storage, study_name="run-1")
    assert not third.scored and [t.recipe for t in again.trials] == [t.recipe for t in result.trials]


def test_greedy_soup_scores_candidate_soups():
    def loss(recipe: Recipe) -> float:
        return {("north",): 1.0, ("south",): 2.0, ("north", "south"): 0.5}[tuple(recipe.experts)]

    result = search("soup_greedy", EXPERTS, SearchSettings(), Counting(loss))
    assert [t.recipe.experts for t in result.trials] == [["north"], ["south"], ["north", "south"]]
    assert result.best.recipe.experts == ["north", "south"] and result.best.loss == 0.5
