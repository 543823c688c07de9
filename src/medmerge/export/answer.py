"""Answering one question: input checks, streaming, and the safety notice that ends every answer."""

from __future__ import annotations

from collections.abc import Iterator

from medmerge.config import AnswerConfig
from medmerge.errors import MedmergeError
from medmerge.export.engines import Engine, prompt_ids, stream_text


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
    answer's pieces followed by the safety notice."""
    text = check_question(question, config)
    prompt = prompt_ids(engine, text, config.system_prompt)

    def pieces() -> Iterator[str]:
        yield from stream_text(engine, prompt, config.max_new_tokens)
        suffix = notice_suffix(config)
        if suffix:
            yield suffix

    return pieces()
