"""Run one heavy step in a child process, so that what it held is returned to the system when it ends.

A long study trains, computes statistics, searches and evaluates in turn. In one process, memory that a
step freed stays in the allocator's arenas (glibc keeps freed heap pages, torch keeps its own caches),
and the next step starts above it: the study's peak grew past its largest step (issue #11 §6). A child
process gives every byte back when it exits, so the parent stays at its import footprint and the study's
peak is its largest step's.

The child is started with `spawn` (a fresh interpreter: no copy of the parent's heap, no forked
OpenMP or tokenizer threads), inherits stdout/stderr (progress bars show as usual) and the environment
(`MEDMERGE_CACHE`, `MEDMERGE_DATA`), and sets torch's threads to the step's setting.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from medmerge.errors import MedmergeError

T = TypeVar("T")


def run_in_child(what: str, fn: Callable[..., T], *args: Any, threads: int | None = None, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a spawned child process; its return value, or its exception raised here.

    `fn` must be importable by name (a module-level function) and its arguments and result picklable.
    `what` names the step in the one-line error raised when the child dies without an answer (killed,
    or out of memory).
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=_child_main, args=(send, fn, args, kwargs, threads), name=f"medmerge: {what}", daemon=False
    )
    child.start()
    send.close()  # the child holds the only sending end: its death ends `recv` with EOFError
    try:
        succeeded, value = receive.recv()
    except EOFError:
        child.join()
        raise MedmergeError(
            f"{what}: its child process ended with exit code {child.exitcode} before answering"
            " (killed, or out of memory?)"
        ) from None
    except BaseException:  # KeyboardInterrupt: the child got the same signal; do not leave it behind
        child.terminate()
        child.join()
        raise
    finally:
        receive.close()
    child.join()
    if not succeeded:
        raise value
    return value


def _child_main(send: Any, fn: Callable[..., Any], args: tuple, kwargs: dict, threads: int | None) -> None:
    from medmerge.threads import use_threads

    use_threads(threads)
    try:
        outcome: tuple[bool, Any] = (True, fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - every failure is handed to the parent
        outcome = (False, _picklable(exc))
    try:
        send.send(outcome)
    finally:
        send.close()


def _picklable(exc: BaseException) -> BaseException:
    """`exc` with its child-side traceback as a note, or a MedmergeError of its text if it cannot be
    pickled."""
    import pickle

    exc.add_note("".join(traceback.format_exception(exc)).rstrip())
    try:
        pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - an exception type that does not pickle
        return MedmergeError(f"{type(exc).__name__}: {exc}")
    return exc
