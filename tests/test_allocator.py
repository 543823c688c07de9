"""medmerge.allocator: the streaming allocator settings apply before torch is imported, and only then."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medmerge.allocator import tune_for_streaming

PROBE = (
    "import os, sys; from medmerge.allocator import tune_for_streaming; "
    "applied = tune_for_streaming(); import torch; "
    "print(applied, os.environ.get('THP_MEM_ALLOC_ENABLE'))"
)


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "MEDMERGE_ALLOCATOR")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=clean | env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_fresh_process_is_tuned_before_torch_starts():
    assert _probe() == "True 1"


def test_default_leaves_the_allocators_alone():
    assert _probe(MEDMERGE_ALLOCATOR="default") == "False None"


def test_too_late_once_torch_is_imported():
    import torch  # noqa: F401 (the point of the test)

    assert tune_for_streaming() is False
