"""One record type for a medical Q&A pair, and the result of loading a dataset."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_WHITESPACE = re.compile(r"\s+")


def normalise_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs, non-breaking spaces) to one space; strip."""
    return _WHITESPACE.sub(" ", text.replace("\u00a0", " ")).strip()


def normalise_question(text: str) -> str:
    """The key two questions share when they are the same question: lower-case, single-spaced."""
    return normalise_whitespace(text).lower()


@dataclass(frozen=True)
class QAPair:
    """One question and its reference answer.

    `focus` (the disease, drug or topic asked about), `qtype` (MedQuAD's question type) and `doc_id`
    are kept where the source has them; `group` is a users' table's `group` column (e.g. one patient or
    topic: the pairs that share it are one unit of group-level privacy, and never straddle splits);
    `extra` holds source-specific fields (PubMedQA's final_decision).
    """

    id: str
    question: str
    answer: str
    source: str
    focus: str | None = None
    qtype: str | None = None
    doc_id: str | None = None
    group: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def group_key(self) -> str:
        """What must never straddle train and test: the `group` column where given, else the focus, else
        the source document, else the normalised question."""
        if self.group:
            return "group:" + self.group
        if self.focus:
            return "focus:" + normalise_question(self.focus)
        if self.doc_id:
            return f"doc:{self.source}/{self.doc_id}"
        return "question:" + normalise_question(self.question)

    def privacy_group(self) -> str | None:
        """The unit of group-level differential privacy this pair belongs to (medmerge.train.privacy),
        where the source knows one: its `group` column, MedQuAD's focus (or its document where the focus
        is empty); None where the source knows no group (the pair is then a unit of its own)."""
        if self.group or self.focus or self.doc_id:
            return self.group_key()
        return None


@dataclass
class Dataset:
    """Pairs loaded from one SPEC, with an account of everything that was skipped and why."""

    spec: str
    source: str
    pairs: list[QAPair]
    skipped: Counter[str] = field(default_factory=Counter)  # reason (and collection) -> count
    bad_files: list[str] = field(default_factory=list)  # "file: why", for documents that failed to parse

    def __len__(self) -> int:
        return len(self.pairs)
