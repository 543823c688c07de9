"""`medmerge data stats SPEC`: counts, what was skipped, answer lengths in tokens, split sizes."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from medmerge.data.resolve import load_dataset
from medmerge.data.split import DEFAULT_FRACTIONS, split_pairs


def dataset_stats(
    spec: str, tokenizer: Any, seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, Any]:
    """Everything `data stats` prints, as a dict (lengths are token counts of `tokenizer`)."""
    dataset = load_dataset(spec)
    splits = split_pairs(dataset.pairs, fractions, seed)
    answers = [p.answer for p in dataset.pairs]
    questions = [p.question for p in dataset.pairs]
    answer_tokens = np.array([len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]])
    question_tokens = np.array(
        [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    )
    percentiles = (5, 25, 50, 75, 95, 99)
    return {
        "spec": dataset.spec,
        "pairs": len(dataset),
        "skipped": dict(sorted(dataset.skipped.items())),
        "by_schema": dict(Counter(p.extra["schema"] for p in dataset.pairs if "schema" in p.extra)),
        "bad_files": dataset.bad_files,
        "duplicates_removed": splits.duplicates_removed,
        "splits": splits.sizes(),
        "split_seed": seed,
        "answer_tokens": {f"p{q}": int(np.percentile(answer_tokens, q)) for q in percentiles},
        "answer_tokens_mean": round(float(answer_tokens.mean()), 1),
        "question_tokens": {f"p{q}": int(np.percentile(question_tokens, q)) for q in percentiles},
    }


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable rendering of `dataset_stats`."""
    lines = [f"{stats['spec']}", f"  answered pairs      {stats['pairs']:,}"]
    if len(stats["by_schema"]) > 1:
        lines.append("    by XML schema: " + ", ".join(f"<{k}> {v:,}" for k, v in stats["by_schema"].items()))
    if stats["skipped"]:
        lines.append(f"  skipped             {sum(stats['skipped'].values()):,}")
        lines += [f"    {reason:<40} {count:,}" for reason, count in stats["skipped"].items()]
    for bad in stats["bad_files"][:5]:
        lines.append(f"    bad file: {bad}")
    lines.append(f"  duplicate questions {stats['duplicates_removed']:,} removed before splitting")
    sizes = stats["splits"]
    lines.append(
        f"  splits (seed {stats['split_seed']})     train {sizes['train']:,}"
        f" · validation {sizes['validation']:,} · test {sizes['test']:,}"
    )
    for field in ("answer_tokens", "question_tokens"):
        row = " ".join(f"{k}={v}" for k, v in stats[field].items())
        lines.append(f"  {field.replace('_', ' '):<19} {row}")
    lines.append(f"  answer tokens mean  {stats['answer_tokens_mean']}")
    return "\n".join(lines)
