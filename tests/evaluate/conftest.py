"""Evaluation tests run torch on one thread: tiny models gain nothing from more, and on a shared CPU
OpenMP threads spin-waiting for each other made batched generation 20× slower (measured)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
