"""Training data: a multi-SPEC validation set is drawn from every SPEC in turn."""

from __future__ import annotations

import json
from pathlib import Path

from medmerge.models import load_tokenizer
from medmerge.train.examples import _round_robin, prepare_data
from tests.train.helpers import tiny_config


def _jsonl(path: Path, topic: str, n: int) -> Path:
    rows = [{"question": f"What is {topic} {i}?", "answer": f"{topic} {i} is a condition."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_round_robin() -> None:
    assert _round_robin([[1, 2, 3], ["a"], [None, None]]) == [1, "a", None, 2, None, 3]


def test_validation_cap_takes_every_spec_alike(tiny_llama: Path, tmp_path: Path) -> None:
    first, second = _jsonl(tmp_path / "a.jsonl", "asthma", 60), _jsonl(tmp_path / "b.jsonl", "gout", 60)
    config = tiny_config(
        tiny_llama,
        first,
        data={"specs": [f"jsonl:{first}", f"jsonl:{second}"], "fractions": [0.5, 0.5, 0.0]},
        eval_examples=6,
    )
    tokenizer = load_tokenizer(tiny_llama)
    data = prepare_data(config, tokenizer, "causal")
    texts = [tokenizer.decode(e["input_ids"]) for e in data.validation]
    assert len(texts) == 6
    assert sum("asthma" in t for t in texts) == 3 and sum("gout" in t for t in texts) == 3
