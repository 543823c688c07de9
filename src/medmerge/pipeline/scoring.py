"""Score a merge without writing it: merged tensors go straight into a resident model, then the
validation answer loss (medmerge.evaluate) of each dataset, averaged over datasets.

The same function serves local search and Ray workers (each worker keeps its own resident model and
encoded validation batches, keyed by the `Scoring` it was given).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from medmerge.config import MergeConfig
from medmerge.errors import MedmergeError


@dataclass(frozen=True)
class Scoring:
    """What a merge is scored on: validation splits of `specs`, first `max_examples` of each."""

    base_model: str
    specs: tuple[str, ...]
    split_seed: int
    fractions: tuple[float, float, float]
    max_examples: int
    batch_size: int
    max_prompt_tokens: int
    max_answer_tokens: int
    threads: int | None = None


@lru_cache(maxsize=2)
def _resident(scoring: Scoring) -> tuple[Any, dict[str, Any]]:
    """The scoring model (the base, weights replaced per merge) and one loss scorer per dataset."""
    from medmerge.evaluate.scorer import validation_loss_scorer
    from medmerge.models import load_model, load_tokenizer, model_kind, resolve_model

    if scoring.threads:
        torch.set_num_threads(scoring.threads)
    path = resolve_model(scoring.base_model)
    tokenizer, kind = load_tokenizer(path), model_kind(path)
    scorers = {
        spec: validation_loss_scorer(
            [spec],
            tokenizer,
            kind,
            split="validation",
            seed=scoring.split_seed,
            fractions=scoring.fractions,
            max_examples=scoring.max_examples,
            batch_size=scoring.batch_size,
            max_prompt_tokens=scoring.max_prompt_tokens,
            max_answer_tokens=scoring.max_answer_tokens,
        )
        for spec in scoring.specs
    }
    return load_model(path), scorers


def merged_state(config: MergeConfig) -> dict[str, torch.Tensor]:
    """The merged float32 tensors of `config`, by name, computed by the merge engine's own loop."""
    from medmerge.merge.engine import merge_tensors, open_merge_inputs
    from medmerge.merge.registry import get_method

    base, sources = open_merge_inputs(config)
    names = list((base or sources[0]).infos)
    stream = merge_tensors(
        get_method(config.method),
        config.method_params(),
        base,
        sources,
        [m.weight for m in config.models],
        names,
        progress=False,
    )
    return {name: tensor for name, tensor, _ in stream}


def load_weights(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model`; every parameter must be covered (tied heads follow their embedding)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = (
        set(getattr(model, "_tied_weights_keys", None) or []) if model.config.tie_word_embeddings else set()
    )
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise MedmergeError(
            f"merged weights do not fit the base model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def score_merge(config: MergeConfig, scoring: Scoring) -> dict[str, Any]:
    """Validation answer loss (nats/token) of the merge of `config`: per dataset, and their mean."""
    model, scorers = _resident(scoring)
    load_weights(model, merged_state(config))
    per_dataset = {spec: float(score(model)) for spec, score in scorers.items()}
    return {"loss": sum(per_dataset.values()) / len(per_dataset), "per_dataset": per_dataset}


def score_model(path: str, scoring: Scoring) -> dict[str, Any]:
    """Validation answer loss of a model or adapter folder (experts, multi-task, base)."""
    from medmerge.models import load_model

    _, scorers = _resident(scoring)
    model = load_model(path)
    per_dataset = {spec: float(score(model)) for spec, score in scorers.items()}
    return {"loss": sum(per_dataset.values()) / len(per_dataset), "per_dataset": per_dataset}
