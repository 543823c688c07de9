"""The CPU runtime helpers of medmerge.train.precision."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt / malloc_trim")
def test_reuse_freed_memory_keeps_then_returns_freed_blocks() -> None:
    """Inside: freed 1 MiB blocks stay resident for reuse. On exit: malloc_trim hands them back."""
    from medmerge.train.precision import reuse_freed_memory

    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    with reuse_freed_memory(enabled=False) as active:
        assert active is False
    with reuse_freed_memory() as active:
        assert active is True
        blocks = [torch.ones(1 << 18) for _ in range(256)]  # 256 × 1 MiB, below the 32 MiB threshold
        held = rss_mib()
        del blocks
        assert rss_mib() > held - 64  # still resident
    assert rss_mib() < held - 192  # returned on exit
