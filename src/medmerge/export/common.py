"""What the answer engines share: the export manifest, thread counts, end-of-answer ids, repeat checks.

Kept apart from `medmerge.export.engines` so that each engine module imports this one and the engine
registry imports the engines, with no circle between them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError

EXPORT_MANIFEST = "medmerge-export.json"


def default_threads() -> int:
    """Threads for an edge engine: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_export_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The export manifest of a folder written by `medmerge export`, or None for other folders."""
    file = Path(path) / EXPORT_MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise MedmergeError(f"{file}: unreadable export manifest ({exc})") from None


def llama_cpp_available() -> bool:
    """True when the optional llama-cpp-python runtime is importable."""
    return importlib.util.find_spec("llama_cpp") is not None


def until_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """`ids` cut after the first eos (kept), as a list."""
    out = []
    for token in ids:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def eos_ids(tokenizer: Any, config_eos: int | list[int] | None = None) -> list[int]:
    """The ids that end an answer: the tokenizer's eos and the model config's eos id(s)."""
    found = [] if config_eos is None else ([config_eos] if isinstance(config_eos, int) else list(config_eos))
    if tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    return sorted(set(found))


def banned_ngram_tokens(ids: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `ids` (Hugging Face's no_repeat_ngram rule)."""
    if n <= 0 or len(ids) + 1 < n:
        return []
    prefix = tuple(ids[len(ids) - n + 1 :]) if n > 1 else ()
    return sorted({ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i : i + n - 1]) == prefix})


class RepeatWatch:
    """Watches an answer token by token: `push` is True once the last `n` tokens already occurred, in the
    same order, earlier in the answer (the answer has started to loop). n = 0 never fires."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ids: list[int] = []
        self.seen: set[tuple[int, ...]] = set()

    def push(self, token: int) -> bool:
        if self.n <= 0:
            return False
        self.ids.append(int(token))
        if len(self.ids) < self.n:
            return False
        gram = tuple(self.ids[-self.n :])
        if gram in self.seen:
            return True
        self.seen.add(gram)
        return False
