"""Greedy model soup (Wortsman et al., "Model soups", ICML 2022, Recipe 1) and its validation scorer.

Candidates are ranked by their own validation score; walking down that ranking, each is added to the
soup (uniform average of the members) only if the soup's score does not drop. Scores are "higher is
better"; the loss scorer returns −(mean answer NLL per token, nats) on validation pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from medmerge.config import MergeScorerConfig

T = TypeVar("T")
Scorer = Callable[[Path], float]  # model folder → validation score, higher is better


@dataclass(frozen=True)
class SoupResult:
    members: list[int]  # indices into the candidates, in the order they joined
    score: float  # score of the final soup
    individual: list[float]  # each candidate's own score
    history: list[dict[str, object]] = field(default_factory=list)  # one entry per tried addition


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


def loss_scorer(config: MergeScorerConfig) -> Scorer:
    """A scorer from validation data: −(mean answer NLL per token, nats) of the model folder it is given.

    Built on medmerge.evaluate.scorer.validation_loss_scorer (questions encoded once, with the tokenizer
    of the first folder scored; the merge checks guarantee every candidate shares it).
    """
    from medmerge.evaluate.scorer import validation_loss_scorer
    from medmerge.models import load_model, load_tokenizer, model_kind

    state: dict[str, Callable] = {}

    def score(path: Path) -> float:
        if "loss" not in state:
            state["loss"] = validation_loss_scorer(
                config.specs,
                load_tokenizer(path),
                model_kind(path),
                split=config.split,
                seed=config.split_seed,
                fractions=config.fractions,
                max_examples=config.max_examples,
                batch_size=config.batch_size,
                max_prompt_tokens=config.max_prompt_tokens,
                max_answer_tokens=config.max_answer_tokens,
            )
        return -float(state["loss"](load_model(path)))

    return score
