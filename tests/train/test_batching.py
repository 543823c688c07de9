"""Length-grouped batches, per-rank shards, resumable streams, and the learning-rate schedule."""

from __future__ import annotations

import math
import random

import pytest

from medmerge.errors import MedmergeError
from medmerge.train.batching import BatchStream, epoch_batches, eval_batches
from medmerge.train.loop import lr_factor


def _lengths(n: int = 203, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 300) for _ in range(n)]


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    """Σ over batches of (B · longest − Σ lengths): pad tokens that dynamic padding adds."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_epoch_batches_are_full_distinct_and_seeded() -> None:
    lengths = _lengths()
    batches = epoch_batches(lengths, 8, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert all(len(b) == 8 for b in batches)
    assert len(flat) == len(set(flat)) == (len(lengths) // 8) * 8
    assert batches == epoch_batches(lengths, 8, seed=3, epoch=0)
    assert batches != epoch_batches(lengths, 8, seed=3, epoch=1)
    assert batches != epoch_batches(lengths, 8, seed=4, epoch=0)


def test_length_grouping_cuts_padding() -> None:
    lengths = _lengths(800)
    grouped = epoch_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 8, seed=0, epoch=0, group_by_length=False)
    assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)


def test_ranks_read_disjoint_shards_of_equal_size() -> None:
    lengths = _lengths()
    whole = epoch_batches(lengths, 4, seed=0, epoch=2, world=1)
    shards = [epoch_batches(lengths, 4, seed=0, epoch=2, rank=r, world=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))
    assert {tuple(b) for s in shards for b in s} <= {tuple(b) for b in whole}


def test_too_few_examples_is_an_error() -> None:
    with pytest.raises(MedmergeError, match="fewer than batch_size"):
        epoch_batches([3, 4, 5], 2, seed=0, epoch=0, world=2)


def test_stream_resumes_at_its_position_across_epochs() -> None:
    lengths = _lengths(40)
    stream = BatchStream(lengths, 4, seed=7)
    first = [next(stream) for _ in range(13)]  # 10 batches per epoch: crosses into epoch 1
    state = stream.state()
    assert state == {"epoch": 1, "index": 3}
    rest = [next(stream) for _ in range(9)]
    resumed = BatchStream(lengths, 4, seed=7)
    resumed.load_state(state)
    assert [next(resumed) for _ in range(9)] == rest
    assert first[:10] == epoch_batches(lengths, 4, 7, 0)


def test_eval_batches_cover_everything_once() -> None:
    lengths = _lengths(50)
    parts = [eval_batches(lengths, 8, rank=r, world=2) for r in range(2)]
    seen = sorted(i for p in parts for b in p for i in b)
    assert seen == list(range(50))


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_factor(0, 4, 20, 0.0) == pytest.approx(1 / 5)
    assert lr_factor(3, 4, 20, 0.0) == pytest.approx(4 / 5)
    assert lr_factor(4, 4, 20, 0.0) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.0) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(8, 0, 16, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
