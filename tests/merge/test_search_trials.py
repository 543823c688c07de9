"""The merge search draws exactly the trials it drew before the methods declared their own search ranges.

`fixtures/search_trials.json` was recorded ONCE by running `record()` of this module against the code of
commit 5e671a6 (main before issue 24: search ranges in medmerge/merge/spaces.py, first trials in the
registry's `default` dicts), in a scratch worktree:

    PYTHONPATH=<old worktree>/src:. python -c "from tests.merge.test_search_trials import record; record()"

It holds, for every registered method, 1 to 3 experts (as many as the method takes) and two seeded
samplers (TPE past its 10 random start-up trials, and random), the settings the search proposed, in
order: parameters by YAML name and weights, compared here to the bit (floats round-trip through JSON).
The same Optuna calls in the same order over the same ranges give the same draws, so any change of a
range, of the order of the draws, of a first-trial value or of which knobs a method has fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medmerge.config import SearchSettings
from medmerge.merge.recipe import Recipe
from medmerge.merge.registry import METHODS
from medmerge.merge.search import Scored, search

FIXTURE = Path(__file__).parent / "fixtures" / "search_trials.json"
SAMPLERS = {"tpe": 12, "random": 4}  # sampler → trials
SEED = 7


def _loss(recipe: Recipe) -> float:
    """A deterministic bowl over every number of the recipe, so TPE's model has something to fit."""
    numbers = [float(v) for v in recipe.parameters.values() if isinstance(v, int | float)]
    return sum((v - 0.45) ** 2 for v in numbers) + sum((w - 0.6) ** 2 for w in recipe.weights)


def _score(recipes: list[Recipe], first: int) -> list[Scored]:
    return [Scored(_loss(r)) for r in recipes]


def _counts(name: str) -> list[int]:
    spec = METHODS[name]
    top = spec.max_models if spec.max_models is not None else 3
    return [n for n in (1, 2, 3) if spec.min_models <= n <= top]


def cases() -> list[tuple[str, int, str]]:
    return [(m, n, s) for m in sorted(METHODS) for n in _counts(m) for s in SAMPLERS]


def proposed(method: str, n: int, sampler: str) -> list[dict[str, Any]]:
    """The settings a seeded search of `method` over n experts proposes, in order."""
    experts = [f"e{i}" for i in range(n)]
    settings = SearchSettings(trials=SAMPLERS[sampler], seed=SEED, sampler=sampler)
    result = search(method, experts, settings, _score)
    return [
        {"parameters": t.recipe.parameters, "weights": t.recipe.weights, "experts": t.recipe.experts}
        for t in result.trials
    ]


def record(path: Path = FIXTURE) -> None:
    """Write the fixture from the code at hand (run once, on the old code; see the module doc)."""
    data = {f"{m}/{n}/{s}": proposed(m, n, s) for m, n, s in cases()}
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(data.items())]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one case a line


RECORDED = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}


def test_every_recorded_method_and_count_is_still_searched():
    """Every case of the old code is still a case (a method added later has none recorded)."""
    assert len(RECORDED) == 120 and set(RECORDED) <= {f"{m}/{n}/{s}" for m, n, s in cases()}


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_the_search_proposes_the_recorded_trials(case: str):
    method, n, sampler = case.split("/")
    assert proposed(method, int(n), sampler) == RECORDED[case]
