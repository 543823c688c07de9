"""Score a merge without writing it: merged tensors go straight into a resident model, then the
validation answer loss (medmerge.evaluate) of each dataset, averaged over datasets.

The same function serves local search and Ray workers (each worker keeps its own resident model and
encoded validation batches, keyed by the `Scoring` it was given). Torch threads are not set here: the
command's entry point sets them once (Ray gives each 1-CPU task one OpenMP thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from medmerge.config import LossSettings, MergeConfig, SplitSettings


@dataclass(frozen=True)
class Scoring:
    """What a merge is scored on: validation splits of `specs`, first `max_examples` of each."""

    base_model: str
    specs: tuple[str, ...]
    split: SplitSettings
    max_examples: int
    loss: LossSettings  # batches and token limits of the validation loss


@dataclass(frozen=True)
class ScoredLoss:
    """Validation answer loss (nats/token): the mean over datasets, and each dataset's."""

    loss: float
    per_dataset: dict[str, float]

    @classmethod
    def of(cls, per_dataset: dict[str, float]) -> ScoredLoss:
        return cls(loss=sum(per_dataset.values()) / len(per_dataset), per_dataset=per_dataset)


@lru_cache(maxsize=2)
def _resident(scoring: Scoring) -> tuple[Any, dict[str, Any]]:
    """The scoring model (the base, weights replaced per merge) and one loss scorer per dataset."""
    from medmerge.evaluate.scorer import validation_loss_scorer
    from medmerge.models import load_model, load_tokenizer, model_kind, resolve_model

    path = resolve_model(scoring.base_model)
    tokenizer, kind = load_tokenizer(path), model_kind(path)
    scorers = {
        spec: validation_loss_scorer(
            [spec],
            tokenizer,
            kind,
            split="validation",
            seed=scoring.split.split_seed,
            fractions=scoring.split.fractions,
            max_examples=scoring.max_examples,
            batch_size=scoring.loss.batch_size,
            max_prompt_tokens=scoring.loss.max_prompt_tokens,
            max_answer_tokens=scoring.loss.max_answer_tokens,
        )
        for spec in scoring.specs
    }
    return load_model(path), scorers


def score_merge(config: MergeConfig, scoring: Scoring) -> ScoredLoss:
    """Validation answer loss (nats/token) of the merge of `config`: per dataset, and their mean."""
    from medmerge.evaluate.scorer import merged_losses

    model, scorers = _resident(scoring)
    return ScoredLoss.of(merged_losses(model, config, scorers))


def score_model(path: str, scoring: Scoring) -> dict[str, Any]:
    """Validation answer loss of a model or adapter folder (experts, multi-task, base):
    {"loss": mean over datasets, "per_dataset": {SPEC: loss}}."""
    from medmerge.models import load_model

    _, scorers = _resident(scoring)
    model = load_model(path)
    scored = ScoredLoss.of({spec: float(score(model)) for spec, score in scorers.items()})
    return {"loss": scored.loss, "per_dataset": scored.per_dataset}
