"""`run_in_child`: a step runs in a spawned child; its value, its errors and its death reach the parent."""

from __future__ import annotations

import os
import signal

import pytest

from medmerge.errors import MedmergeError
from medmerge.isolation import run_in_child


def _pid_and_threads(offset: int, *, scale: int = 1) -> tuple[int, int, int]:
    import torch

    return os.getpid(), torch.get_num_threads(), offset * scale


def _fails(message: str) -> None:
    raise MedmergeError(message)


def _dies() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_the_step_runs_in_another_process_with_its_threads() -> None:
    pid, threads, value = run_in_child("probe", _pid_and_threads, 21, scale=2, threads=1)
    assert pid != os.getpid() and threads == 1 and value == 42


def test_an_error_in_the_child_is_raised_here_with_its_traceback() -> None:
    with pytest.raises(MedmergeError, match="data.jsonl: expected a question") as raised:
        run_in_child("probe", _fails, "data.jsonl: expected a question")
    assert any("_fails" in note for note in raised.value.__notes__)


def test_a_child_that_dies_is_named_in_one_line() -> None:
    with pytest.raises(MedmergeError, match=r"^expert x: its child process ended with exit code -9"):
        run_in_child("expert x", _dies)
