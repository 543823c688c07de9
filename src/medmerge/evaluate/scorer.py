"""Teacher-forced answer loss over a question set: batches encoded once, and the merge-search scorer.

`validation_loss_scorer(...)` encodes the validation questions of some SPECs once and returns a function
model → mean answer NLL per token (nats; lower is better), computed by `medmerge.loss`. Greedy
soups and merge search call it on every candidate; all candidates must share the tokenizer.

Merges are scored in memory: `merged_losses` loads a merge config's tensors (the merge engine's own
loop) into a resident model and runs the loss functions on it; `merge_loss_scorer` builds the greedy
soup's scorer of `medmerge merge` from a MergeScorerConfig.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from medmerge.data import DEFAULT_FRACTIONS, QAPair, encode_pair, load_split, pad_batch
from medmerge.errors import MedmergeError
from medmerge.loss import answer_loss, answer_loss_per_example

if TYPE_CHECKING:
    from medmerge.config import MergeConfig, MergeScorerConfig


def encode_loss_batches(
    pairs: Sequence[QAPair],
    tokenizer: Any,
    kind: str,
    *,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
    max_answer_tokens: int = 256,
    system: str | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Right-padded batches of (prompt ‖ answer) examples sorted by length, and `order`:
    batch row k (counting across batches) is pairs[order[k]]."""
    examples = [
        encode_pair(p.question, p.answer, tokenizer, kind, max_prompt_tokens, max_answer_tokens, system)
        for p in pairs
    ]
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]["input_ids"]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [
        pad_batch([examples[i] for i in order[s : s + batch_size]], pad_id, side="right")
        for s in range(0, len(order), batch_size)
    ]
    return batches, order


def per_question_loss(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], order: list[int]
) -> tuple[list[float], list[int]]:
    """Summed answer NLL (nats) and answer-token count per question, in the questions' original order."""
    sums, counts = answer_loss_per_example(model, batches)
    nll, tokens = [0.0] * len(order), [0] * len(order)
    for k, i in enumerate(order):
        nll[i], tokens[i] = sums[k], counts[k]
    return nll, tokens


def validation_loss_scorer(
    specs: Sequence[str],
    tokenizer: Any,
    kind: str,
    *,
    split: str = "validation",
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    max_examples: int | None = None,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
    max_answer_tokens: int = 256,
) -> Callable[[Any], float]:
    """A scorer model → mean answer NLL per token (nats, lower is better) over `split` of `specs`.

    The first `max_examples` pairs of each SPEC's split are encoded once; the score pools all answer
    tokens of all SPECs: Σ nll / Σ tokens.
    """
    pairs = [p for spec in specs for p in load_split(spec, split, seed, fractions, max_examples)]
    batches, _ = encode_loss_batches(
        pairs,
        tokenizer,
        kind,
        batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens,
        max_answer_tokens=max_answer_tokens,
    )

    def score(model: Any) -> float:
        return answer_loss(model, batches).mean

    return score


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


def merged_losses(
    model: Any, config: MergeConfig, losses: Mapping[str, Callable[[Any], float]]
) -> dict[str, float]:
    """{name: loss(model)} after loading the merge of `config` into the resident `model` (no folder is
    written: the merged float32 tensors stream from medmerge.merge.merged_state)."""
    from medmerge.merge import merged_state

    load_weights(model, merged_state(config))
    return {name: float(loss(model)) for name, loss in losses.items()}


class MergeLossScorer:
    """Greedy-soup scorer of `medmerge merge`: a candidate MergeConfig → −(mean answer NLL per token, nats)
    over `config.split` of `config.specs`, all answer tokens pooled. Higher is better.

    The resident model, tokenizer and model kind are those of the first candidate's reference folder
    (its base model, else its first model), loaded on the first call; the questions are encoded once.
    """

    def __init__(self, config: MergeScorerConfig) -> None:
        self.config = config
        self._model: Any = None
        self._loss: Callable[[Any], float] | None = None

    def _load(self, candidate: MergeConfig) -> None:
        from medmerge.merge.engine import reference_folder
        from medmerge.models import load_model, load_tokenizer, model_kind

        path = reference_folder(candidate)
        c = self.config
        self._loss = validation_loss_scorer(
            c.specs,
            load_tokenizer(path),
            model_kind(path),
            split=c.split,
            seed=c.split_seed,
            fractions=c.fractions,
            max_examples=c.max_examples,
            batch_size=c.batch_size,
            max_prompt_tokens=c.max_prompt_tokens,
            max_answer_tokens=c.max_answer_tokens,
        )
        self._model = load_model(path)

    def __call__(self, candidate: MergeConfig) -> float:
        if self._loss is None:
            self._load(candidate)
        return -merged_losses(self._model, candidate, {"loss": self._loss})["loss"]


def merge_loss_scorer(config: MergeScorerConfig) -> MergeLossScorer:
    """The validation-loss scorer of candidate merges described by `config` (see MergeLossScorer)."""
    return MergeLossScorer(config)
