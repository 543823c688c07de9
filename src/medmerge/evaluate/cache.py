"""A content-addressed cache of generations and scores: re-runs and report re-renders cost nothing.

An entry's key (`medmerge.steps.step_key`) is the SHA-256 of the canonical JSON of everything that
decides its numbers: the model checksum (`medmerge.manifest.checksum` of its weights and configs), the
data SPEC, split, split seed, fractions, the fingerprint of the questions, and the generation / metric
settings. Entries are JSON files `<root>/<stage>/<key[:2]>/<key>.json`, written atomically (temp file +
rename), so a crash never leaves a half-written entry, and two runs that race write identical content.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medmerge.manifest import write_json_atomic
from medmerge.models import cache_root


def default_cache_dir() -> Path:
    """`$MEDMERGE_CACHE/eval` (default `~/.cache/medmerge/eval`)."""
    return cache_root() / "eval"


class EvalCache:
    """Get / put JSON payloads by (stage, key); `root=None` disables caching. Counts hits and misses."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, stage: str, key: str) -> Path:
        assert self.root is not None
        return self.root / stage / key[:2] / f"{key}.json"

    def get(self, stage: str, key: str) -> dict[str, Any] | None:
        """The payload stored under (stage, key), or None (a corrupt entry counts as a miss)."""
        if self.root is not None:
            try:
                payload = json.loads(self._path(stage, key).read_text())
                self.hits += 1
                return payload["payload"]
            except (OSError, json.JSONDecodeError, KeyError):
                pass
        self.misses += 1
        return None

    def put(self, stage: str, key: str, payload: dict[str, Any], **about: Any) -> None:
        """Store `payload` (and `about`, the human-readable fields of its key) atomically."""
        if self.root is not None:
            write_json_atomic(self._path(stage, key), {"key": key, "about": about, "payload": payload})

    def cached(
        self, stage: str, key: str, compute: Callable[[], dict[str, Any]], **about: Any
    ) -> tuple[dict[str, Any], bool]:
        """(the payload under (stage, key), True), else (compute(), False) with the result stored."""
        found = self.get(stage, key)
        if found is not None:
            return found, True
        payload = compute()
        self.put(stage, key, payload, **about)
        return payload, False
