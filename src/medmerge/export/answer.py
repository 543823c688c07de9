"""Answering questions: input checks, streaming, the safety notice that ends every answer, and the queue
that lets a server answer many clients with one engine.

`AnswerQueue` runs the engine on one worker thread, one answer at a time (engines keep decoding state);
requests wait in a bounded FIFO and each has its own output queue, so an answer's pieces only ever reach
the request that asked for it. A request that finds the FIFO full is refused at once (`Busy`, with a
retry-after estimate) instead of waiting without bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from medmerge.config import AnswerConfig
from medmerge.config.answer import Decoding
from medmerge.errors import MedmergeError
from medmerge.export.engines import Engine, TextStream, prompt_ids, stream_text

log = logging.getLogger(__name__)


def check_question(question: str, config: AnswerConfig) -> str:
    """The question stripped of surrounding whitespace; a one-line error if empty or too long."""
    text = question.strip()
    if not text:
        raise MedmergeError(f"question: empty (expected 1 to {config.max_question_chars} characters)")
    if len(text) > config.max_question_chars:
        raise MedmergeError(
            f"question: {len(text)} characters, over the limit of {config.max_question_chars} "
            "(max_question_chars in the answer config)"
        )
    return text


def notice_suffix(config: AnswerConfig) -> str:
    """The text appended after every answer: a blank line and the notice (nothing if explicitly removed)."""
    return f"\n\n{config.notice.strip()}" if config.notice.strip() else ""


def answer_stream(engine: Engine, question: str, config: AnswerConfig) -> Iterator[str]:
    """Check `question` now (errors raise here, before any output), then return an iterator of the
    answer's pieces (decoded with `config.decoding`) followed by the safety notice."""
    text = check_question(question, config)
    prompt = prompt_ids(engine, text, config.system_prompt)

    def pieces() -> Iterator[str]:
        yield from stream_text(engine, prompt, config.max_new_tokens, config.decoding)
        suffix = notice_suffix(config)
        if suffix:
            yield suffix

    return pieces()


class Busy(Exception):
    """The answer queue is full; `retry_after` is an estimate in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"busy: every answer slot is taken; retry in about {retry_after} s")
        self.retry_after = retry_after


_DONE = object()


@dataclass
class Job:
    """One request's answer: what to decode, and where its pieces go (its own asyncio queue)."""

    prompt: list[int]
    max_new_tokens: int
    decoding: Decoding
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: TextStream | None = None  # set by the worker: tokens and finish_reason once done

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shutting down): nobody is listening
            self.cancelled.set()

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text pieces as the worker produces them; leaving early cancels the job."""
        try:
            while True:
                item = await self.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancelled.set()


class AnswerQueue:
    """One worker thread answering jobs one at a time; at most `max_queued` jobs wait behind it."""

    def __init__(self, engine: Engine, max_queued: int) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self._waiting: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.admitted = 0  # the running job + the waiting ones
        self._seconds = 1.0  # running mean of an answer's duration, for Retry-After
        self._worker = threading.Thread(target=self._run, name="medmerge-answers", daemon=True)
        self._worker.start()

    def submit(self, prompt: list[int], max_new_tokens: int, decoding: Decoding) -> Job:
        """Queue an answer (call from the event loop); `Busy` when the queue is full."""
        with self._lock:
            if self.admitted > self.max_queued:
                raise Busy(max(1, math.ceil(self._seconds * self.admitted)))
            self.admitted += 1
        job = Job(prompt, max_new_tokens, decoding, asyncio.get_running_loop())
        self._waiting.put(job)
        return job

    def close(self) -> None:
        """Stop the worker after the job it is running (waiting jobs are dropped)."""
        self._waiting.put(None)

    def _run(self) -> None:
        while (job := self._waiting.get()) is not None:
            start = time.monotonic()
            try:
                if not job.cancelled.is_set():
                    self._answer(job)
            finally:
                with self._lock:
                    self.admitted -= 1
            self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - start)

    def _answer(self, job: Job) -> None:
        try:
            # a client that went away (or a shut-down loop) stops the decoding at the next token
            job.stream = stream_text(
                self.engine, job.prompt, job.max_new_tokens, job.decoding, job.cancelled.is_set
            )
            for piece in job.stream:
                job.emit(piece)
            job.emit(_DONE)
        except Exception as exc:  # noqa: BLE001 - reported to the request; the worker keeps serving
            log.exception("answer failed")
            job.emit(MedmergeError(f"answer failed: {exc}"))
