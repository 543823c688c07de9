"""Greedy model soup (Wortsman et al., "Model soups", ICML 2022, Recipe 1): the one driver.

Candidates are ranked by their own score; walking down that ranking, each is added to the soup (the
uniform average of the members) only if the soup's score does not drop. Scores are "higher is better".
`greedy_soup` is the pure walk over any candidates; `greedy_soup_merge` runs it over the models of a
merge config, scoring each candidate soup as a uniform linear `MergeConfig` (in memory or on disk:
the scorer decides). `medmerge merge` and the pipeline's search both use `greedy_soup_merge`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from medmerge.config import MergeConfig, MergeInput

T = TypeVar("T")
Scorer = Callable[[MergeConfig], float]  # a merge config → its validation score, higher is better


@dataclass(frozen=True)
class SoupResult:
    members: list[int]  # indices into the candidates, in the order they joined
    score: float  # score of the final soup
    individual: list[float]  # each candidate's own score
    history: list[dict[str, object]] = field(default_factory=list)  # one entry per tried addition


@dataclass(frozen=True)
class Soup:
    """A greedy soup of a merge config's models, and the uniform linear merge that makes it."""

    walk: SoupResult
    config: MergeConfig  # method linear, the members with weight 1, the output form of the request


def greedy_soup(candidates: Sequence[T], score: Callable[[list[T]], float]) -> SoupResult:
    """Greedy soup over `candidates`; `score(members)` scores the uniform soup of `members`.

    Ties keep the candidate order; a candidate joins when score(soup ∪ {c}) ≥ score(soup).
    Calls `score` len(candidates) times for the ranking plus len(candidates) − 1 times for the walk.
    """
    if not candidates:
        raise ValueError("greedy_soup needs at least one candidate")
    individual = [float(score([c])) for c in candidates]
    order = sorted(range(len(candidates)), key=lambda i: -individual[i])
    members, best = [order[0]], individual[order[0]]
    history: list[dict[str, object]] = [{"added": order[0], "score": best, "kept": True}]
    for i in order[1:]:
        trial = float(score([candidates[j] for j in [*members, i]]))
        kept = trial >= best
        history.append({"added": i, "score": trial, "kept": kept})
        if kept:
            members.append(i)
            best = trial
    return SoupResult(members=members, score=best, individual=individual, history=history)


def soup_config(config: MergeConfig, members: Sequence[MergeInput], dtype: str = "float32") -> MergeConfig:
    """The uniform linear merge of `members` with the rest of `config` (base for adapters; the output form
    of `config` when `dtype` is its dtype, else a full model)."""
    return MergeConfig(
        method="linear",
        base_model=config.base_model,
        models=[MergeInput(path=m.path, weight=1.0) for m in members],
        dtype=dtype,
        output=config.output if dtype == config.dtype else "full",
        rank=config.rank if dtype == config.dtype and config.output == "lora" else None,
        shard_mb=config.shard_mb,
    )


def greedy_soup_merge(config: MergeConfig, score: Scorer) -> Soup:
    """The greedy soup of `config.models`; `score` scores each candidate soup (a float32 uniform linear
    merge config). The result's config merges the members in `config`'s dtype and output form."""
    walk = greedy_soup(list(config.models), lambda members: score(soup_config(config, members)))
    final = soup_config(config, [config.models[i] for i in walk.members], dtype=config.dtype)
    return Soup(walk=walk, config=final)
