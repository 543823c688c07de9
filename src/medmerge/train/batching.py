"""Seeded, length-grouped, per-rank batches: dynamic padding without padding waste, resumable by position.

Epoch e of a run with seed s:
  1. permute the example indices with a generator seeded by (s, e);
  2. cut the permutation into mega-batches of `group` × batch_size examples and sort each one by length,
     longest first, so that neighbours have similar lengths (padding is only up to the longest of a batch);
  3. cut into batches of batch_size, drop a last short batch, shuffle the batch order with the same
     generator, and keep a multiple of `world` batches;
  4. rank r takes batches r, r + world, r + 2·world, …  (each process reads its own shard).
The batch list depends only on (seed, epoch, lengths, batch_size, world), so a position (epoch, index)
is all a checkpoint needs to resume exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from medmerge.errors import MedmergeError


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    group_by_length: bool = True,
    group: int = 50,
    rank: int = 0,
    world: int = 1,
) -> list[list[int]]:
    """The batches (lists of example indices) of `rank` for one epoch (see module doc)."""
    n = len(lengths)
    if n < batch_size * world:
        raise MedmergeError(
            f"training set has {n} examples, fewer than batch_size × processes = {batch_size * world}"
        )
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    if group_by_length:
        mega = group * batch_size
        order = [
            i
            for start in range(0, n, mega)
            for i in sorted(order[start : start + mega], key=lambda j: -lengths[j])
        ]
    batches = [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    batches = batches[: len(batches) - len(batches) % world]
    return batches[rank::world]


class BatchStream:
    """An endless stream of one rank's batches across epochs, with a resumable position (epoch, index)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        *,
        group_by_length: bool = True,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group_by_length, self.rank, self.world = group_by_length, rank, world
        self.epoch, self.index = 0, 0
        self._batches = self._make(0)

    def _make(self, epoch: int) -> list[list[int]]:
        return epoch_batches(
            self.lengths,
            self.batch_size,
            self.seed,
            epoch,
            group_by_length=self.group_by_length,
            rank=self.rank,
            world=self.world,
        )

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = self._make(self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._make(self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return batch


def eval_batches(lengths: Sequence[int], batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Validation batches: sorted by length (least padding), rank r takes every world-th batch."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[rank::world]
