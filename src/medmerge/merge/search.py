"""The merge search: one loop for `medmerge run` (which scores in process or on Ray) and for a federated
coordinator (which scores through its sites). Each caller brings its own scorer.

A seeded Optuna sampler (TPE, CMA-ES or random) proposes `settings.trials` recipes over the method's
search space (medmerge.merge.spaces; one trial for a method without knobs); the first trial is always
the method's default setting (all weights 1), so a search never reports worse than the default. The
objective is the scorer's loss, lower is better (validation answer loss, nats/token). A trial whose
loss is not finite (NaN, ±inf) is a failed trial: Optuna is told it failed and it can never be best.
Methods driven by a greedy soup have no knobs: the search is the greedy walk of Wortsman et al.
(medmerge.merge.soup) with the same scorer, every candidate soup a trial.

With `storage` (an Optuna RDB URL, e.g. ``sqlite:///DIR/search.db``) the study outlives the process:
called again with the same storage and study name, the search reuses every finished trial (never
scored again) and goes on to the budget; a trial that was in flight when the process died is told
failed and proposed again with the same parameters. The sampler is then re-seeded with
seed + (finished trials), so a resumed search is reproducible but not identical to an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from medmerge.config import SearchSettings
from medmerge.errors import MedmergeError
from medmerge.merge.recipe import Recipe
from medmerge.merge.registry import MethodSpec, get_method
from medmerge.merge.soup import greedy_soup
from medmerge.merge.spaces import Space, knob_names

RECORD = "medmerge"  # the Optuna user attribute that keeps a scored trial's record


@dataclass(frozen=True)
class Scored:
    """What a scorer returns for one recipe: its loss (nats/token, lower is better; not finite: the
    trial failed) and JSON details kept with the trial (per dataset, per site)."""

    loss: float
    details: Any = None


Scorer = Callable[[list[Recipe], int], list[Scored]]  # (recipes, number of the first) → their scores


@dataclass(frozen=True)
class Trial:
    number: int  # 0, 1, … in the order the trials were scored
    recipe: Recipe
    loss: float  # nats/token; inf for a failed trial
    details: Any = None

    @property
    def failed(self) -> bool:
        return not math.isfinite(self.loss)

    def record(self) -> dict[str, Any]:
        loss = None if self.failed else self.loss
        return {"number": self.number, "recipe": self.recipe.model_dump(mode="json"), "loss": loss} | {
            "details": self.details
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Trial:
        loss = math.inf if data["loss"] is None else float(data["loss"])
        return cls(int(data["number"]), Recipe.model_validate(data["recipe"]), loss, data.get("details"))


@dataclass(frozen=True)
class SearchResult:
    """A method's search: every trial in order, and the best (lowest finite loss; for a soup, the final
    soup)."""

    method: str
    best: Trial
    trials: list[Trial]


def make_sampler(settings: SearchSettings, offset: int = 0) -> Any:
    """The seeded sampler of `settings` (seed + `offset`: a resumed search's)."""
    import optuna

    seed = settings.seed + offset
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    try:
        import cmaes  # noqa: F401  (optuna's CMA-ES sampler needs it)
    except ImportError:
        raise MedmergeError("search.sampler: cmaes needs the `cmaes` package (pip install cmaes)") from None
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def search(
    method: str,
    experts: Sequence[str],
    settings: SearchSettings,
    score: Scorer,
    *,
    parallelism: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    space: Space | None = None,
) -> SearchResult:
    """Search `method`'s recipes over `experts` (names or folders, as `score` reads them); `score` gets
    up to `parallelism` recipes at a time, and the trial number of the first. See the module doc for
    `storage`. `space` replaces the method's search space (e.g. RegMean from secure sums: α only)."""
    from medmerge.extras import require

    require("the merge search", "optuna")
    spec = get_method(method)
    if spec.needs_scorer:
        return _greedy(spec, list(experts), settings.seed, score)
    space = space if space is not None else spec.space
    if space is None:
        raise MedmergeError(f"methods: {method} has no search space")
    return _optuna(spec, space, list(experts), settings, score, parallelism, storage, study_name)


def _optuna(
    spec: MethodSpec,
    space: Space,
    experts: list[str],
    settings: SearchSettings,
    score: Scorer,
    parallelism: int,
    storage: str | None,
    study_name: str | None,
) -> SearchResult:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize",
        sampler=make_sampler(settings),
        storage=storage,
        study_name=study_name,
        load_if_exists=storage is not None,
    )
    trials = _finished(study)
    if trials:  # a resumed study: the sampler goes on from a seed of its own (module doc)
        study.sampler = make_sampler(settings, len(trials))
    knobs = knob_names(space, len(experts))
    if not study.trials:
        default = {**{f"w{i}": 1.0 for i in range(len(experts)) if f"w{i}" in knobs}, **spec.default}
        study.enqueue_trial({k: v for k, v in default.items() if k in knobs})
    budget = settings.trials if knobs else 1
    while len(trials) < budget:
        batch = [study.ask() for _ in range(min(max(parallelism, 1), budget - len(trials)))]
        recipes = []
        for trial in batch:
            setting = space(trial, len(experts))
            weights = setting.weights if setting.weights is not None else [1.0] * len(experts)
            recipe = Recipe(
                method=spec.name,
                parameters=setting.parameters,
                weights=weights,
                seed=settings.seed,
                experts=experts,
            )
            recipes.append(recipe)
        for trial, recipe, scored in zip(batch, recipes, score(recipes, len(trials)), strict=True):
            done = Trial(len(trials), recipe, _finite(scored.loss), scored.details)
            trial.set_user_attr(RECORD, done.record())
            if done.failed:
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, done.loss)
            trials.append(done)
    return SearchResult(spec.name, _best(spec.name, trials), trials)


def _finished(study: Any) -> list[Trial]:
    """The trials a previous run of this study scored, in order; a trial it left in flight (killed) is
    told failed and enqueued again with its parameters."""
    from optuna.trial import TrialState

    done = []
    for trial in study.get_trials(deepcopy=False):
        record = trial.user_attrs.get(RECORD)
        if trial.state == TrialState.RUNNING:
            if record is None:
                study.enqueue_trial(dict(trial.params))
                study.tell(trial.number, state=TrialState.FAIL)
            else:  # scored, but the process died before telling Optuna
                loss = record["loss"]
                state = TrialState.FAIL if loss is None else TrialState.COMPLETE
                study.tell(trial.number, loss, state=state)
        if record is not None:
            done.append(Trial.from_record(record))
    return sorted(done, key=lambda t: t.number)


def _finite(loss: float) -> float:
    loss = float(loss)
    return loss if math.isfinite(loss) else math.inf


def _best(method: str, trials: list[Trial]) -> Trial:
    scored = [t for t in trials if not t.failed]
    if not scored:
        raise MedmergeError(f"search {method}: every trial failed (no finite validation loss)")
    return min(scored, key=lambda t: t.loss)


def _greedy(spec: MethodSpec, experts: list[str], seed: int, score: Scorer) -> SearchResult:
    """The greedy soup of the experts; each candidate soup (the uniform merge of its members, in the
    order they joined) is scored by `score` and kept as a trial."""
    trials: list[Trial] = []

    def walk_score(members: list[str]) -> float:
        recipe = Recipe(method=spec.name, weights=[1.0] * len(members), seed=seed, experts=members)
        (scored,) = score([recipe], len(trials))
        trials.append(Trial(len(trials), recipe, _finite(scored.loss), scored.details))
        return -trials[-1].loss  # the soup maximises; a failed candidate scores −inf

    walk = greedy_soup(experts, walk_score)
    members = [experts[i] for i in walk.members]
    best = next(t for t in reversed(trials) if t.recipe.experts == members and -t.loss == walk.score)
    if best.failed:
        raise MedmergeError(f"search {spec.name}: every trial failed (no finite validation loss)")
    return SearchResult(spec.name, best, trials)
