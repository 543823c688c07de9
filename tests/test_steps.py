"""One key function and one cached step (issue 24).

`fixtures/step_keys.json` was recorded ONCE from the two key functions of the old code (5e671a6:
medmerge.pipeline.steps.step_key and medmerge.evaluate.cache.cache_key, identical on these inputs),
each called with its case of CASES below (train, merge, path, statistics: step_key; the others:
cache_key). The one key function must give every value to the bit, so no cached step or evaluation
entry of an earlier run goes stale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ConfigDict, Field

from medmerge.config.base import StrictModel
from medmerge.steps import STEP_FILE, cached, recorded, step_key

FIXTURE = Path(__file__).parent / "fixtures" / "step_keys.json"


class Knobs(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    lam: float = Field(1.0, alias="lambda")
    name: str = "x"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)


CASES = {  # name: the parts, as the old recorder passed them (to step_key, or to cache_key)
    "train": dict(step="train", config=Knobs(lam=0.5), base="abc", data={"medquad": "d1", "csv:x.csv": None}),
    "merge": dict(step="merge", config=Knobs(), search="k" * 64),
    "path": dict(step="x", folder=Path("/a/b c"), values=[1, 2.5, True, None, "é"]),
    "statistics": dict(statistics={"examples": 256, "kinds": ["gram", "fisher"], "seed": 0}),
    "loss": dict(
        stage="loss", checksum="c0ffee", spec="medquad", split="test", split_seed=0,
        fractions=[0.8, 0.1, 0.1], questions="fp", max_prompt_tokens=256, max_answer_tokens=256,
        system=None, dtype="float32",
    ),
    "adapter": dict(adapter="a" * 64, base="b" * 64),
    "generate": dict(
        stage="generate", checksum="c", spec="pubmedqa", split=None, split_seed=3,
        fractions=[0.5, 0.25, 0.25], questions="q", max_new_tokens=128, do_sample=True, temperature=0.7,
        top_p=0.9, seed=1,
        max_prompt_tokens=64, system="Réponds brièvement.", dtype="bfloat16",
    ),
    "scores": dict(stage="scores", generation="g" * 64, idf=False, v=1),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_one_key_function_gives_the_old_keys(name: str) -> None:
    assert step_key(**CASES[name]) == json.loads(FIXTURE.read_text())[name]


def test_a_key_refuses_what_it_cannot_write_canonically() -> None:
    with pytest.raises(TypeError, match="set"):
        step_key(x={1, 2})


def test_cached_runs_once_per_key_and_reruns_when_the_key_changes(tmp_path: Path) -> None:
    runs: list[str] = []

    def work(tag: str):
        def fn() -> dict:
            runs.append(tag)
            (tmp_path / "out.txt").write_text(tag)
            return {"tag": tag}

        return fn

    record, fresh = cached(tmp_path, "k1", "demo", work("a"))
    assert not fresh and runs == ["a"] and record == {"key": "k1", "step": "demo", "tag": "a"}
    assert recorded(tmp_path / STEP_FILE) == record
    record, fresh = cached(tmp_path, "k1", "demo", work("b"))
    assert fresh and runs == ["a"] and record["tag"] == "a"
    _, fresh = cached(tmp_path, "k2", "demo", work("c"))
    assert not fresh and runs == ["a", "c"] and recorded(tmp_path / STEP_FILE)["key"] == "k2"


def test_a_step_that_fails_leaves_no_fresh_record(tmp_path: Path) -> None:
    cached(tmp_path, "k1", "demo", dict)

    def boom() -> dict:
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError):
        cached(tmp_path, "k2", "demo", boom)
    assert recorded(tmp_path / STEP_FILE) is None  # neither k1 (stale) nor k2 (never finished)
    _, fresh = cached(tmp_path, "k3", "demo", lambda: None)  # None: ran, but not recorded
    assert not fresh and recorded(tmp_path / STEP_FILE) is None
    (tmp_path / STEP_FILE).write_text("{not json")
    assert recorded(tmp_path / STEP_FILE) is None
