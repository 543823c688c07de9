"""Training and validation examples: the data layer's splits, tokenized with the prompt masked out.

Each SPEC of `config.data` is loaded and split on its own (seeded, group-disjoint); the train and
validation parts are concatenated across SPECs. `data.max_examples` keeps the first n pairs of each
split; `eval_examples` caps the validation set, taking pairs from the SPECs in turn (round robin), so a
multi-task model's validation loss weighs every dataset alike instead of mostly the first.
Everything the manifest needs to identify the data (SPEC, file checksum, split sizes and
fingerprints: `origin_fingerprint` over the ids of every pair the SPEC loads, `train_fingerprint` over
the training pairs' ids) is returned with the examples, and each training example's unit of group-level
privacy (`QAPair.privacy_group`: a MedQuAD focus, a `group` column's value; None where unknown).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from medmerge.config import TrainConfig
from medmerge.data import encode_pair, load_dataset, spec_checksum, split_fingerprint, split_pairs
from medmerge.data.prompts import IGNORE_INDEX
from medmerge.errors import MedmergeError
from medmerge.models import ModelKind

Example = dict[str, list[int]]


@dataclass
class TrainData:
    train: list[Example]
    validation: list[Example]
    sources: list[dict[str, Any]] = field(default_factory=list)  # one entry per SPEC, for the manifest
    train_groups: list[str | None] = field(default_factory=list)  # privacy group of each train example


def example_tokens(example: Example, kind: ModelKind) -> int:
    """Tokens a model processes for one example: input ids, plus the decoder's labels for seq2seq."""
    return len(example["input_ids"]) + (len(example["labels"]) if kind == "seq2seq" else 0)


def answer_tokens(example: Example, kind: ModelKind) -> int:
    """Answer tokens the loss counts (causal: labels shifted by one, so the first label is never used)."""
    labels = example["labels"][1:] if kind == "causal" else example["labels"]
    return sum(1 for t in labels if t != IGNORE_INDEX)


def prepare_data(config: TrainConfig, tokenizer: Any, kind: ModelKind) -> TrainData:
    """Load, split and encode the data of `config` (see module doc); empty splits are errors."""
    cut = config.data.max_examples
    out = TrainData(train=[], validation=[])
    train_pairs: list = []
    validation_by_spec: list[list] = []
    for spec in config.data.specs:
        dataset = load_dataset(spec)
        splits = split_pairs(dataset.pairs, config.data.fractions, config.data.split_seed)
        train, validation = splits.train[:cut], splits.validation[:cut]
        if not train:
            raise MedmergeError(
                f"data.specs: {spec} has no training pairs with fractions {config.data.fractions} "
                f"(expected a non-empty train split)"
            )
        train_pairs += train
        validation_by_spec.append(validation)
        out.sources.append(
            {
                "spec": spec,
                "sha256": spec_checksum(spec),
                "split_seed": config.data.split_seed,
                "fractions": list(config.data.fractions),
                "sizes": {"train": len(train), "validation": len(validation)},
                "origin_fingerprint": split_fingerprint(dataset.pairs),
                "train_fingerprint": split_fingerprint(train),
                "validation_fingerprint": split_fingerprint(validation),
            }
        )
    validation = _round_robin(validation_by_spec)[: config.eval_examples]
    if not validation:
        raise MedmergeError(
            f"data.fractions: {config.data.fractions} leaves no validation pairs "
            "(expected a validation share > 0: validation loss drives keep-best and early stopping)"
        )

    def encode(pairs: list) -> list[Example]:
        return [
            encode_pair(
                p.question,
                p.answer,
                tokenizer,
                kind,
                config.max_prompt_tokens,
                config.max_answer_tokens,
                config.system_prompt,
            )
            for p in pairs
        ]

    out.train, out.validation = encode(train_pairs), encode(validation)
    out.train_groups = [p.privacy_group() for p in train_pairs]
    return out


def _round_robin(lists: list[list]) -> list:
    """[a0, b0, c0, a1, b1, a2, …]: one item of each list in turn, skipping lists that ran out."""
    return [item for row in itertools.zip_longest(*lists, fillvalue=_GAP) for item in row if item is not _GAP]


_GAP = object()
