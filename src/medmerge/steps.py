"""One cached step: a step is fresh when its record holds the key it would get now.

A key (`step_key`) is the SHA-256 of the canonical JSON of everything a step depends on: its own
settings and the keys or checksums of what it reads. Changing a setting changes the keys downstream of
it, and only those. The same function keys `medmerge run`'s steps (medmerge.pipeline.run) and the
evaluation cache's entries (medmerge.evaluate).

`cached(folder, key, label, fn)` runs a step at most once per key: a record (JSON, `key` + `step` +
what `fn` returned) in `folder` says what was computed there; it is removed before `fn` runs and written
(atomically) after it returns, so a step that fails midway is never taken for fresh.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEP_FILE = "medmerge-step.json"  # a step's record in its folder (one of manifest.PROVENANCE_FILES)


def step_key(**parts: Any) -> str:
    """SHA-256 of the canonical JSON of `parts` (sorted keys, no whitespace; pydantic models dumped as
    JSON by alias, paths as text); anything else JSON cannot write is a TypeError."""

    def plain(value: Any) -> Any:
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json", by_alias=True)
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"not JSON-serialisable in a step key: {type(value).__name__}")

    text = json.dumps(parts, sort_keys=True, default=plain, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def recorded(path: Path) -> dict[str, Any] | None:
    """The step record at `path`, or None (missing, unreadable or not a record)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "key" in record else None


def cached(
    folder: Path, key: str, label: str, fn: Callable[[], dict[str, Any] | None], *, record: str = STEP_FILE
) -> tuple[dict[str, Any], bool]:
    """(the record, True) when `folder/record` holds `key`; else runs `fn()`, records
    {"key": key, "step": label, **what fn returned} and returns (that record, False). `fn` returning None
    ran the step but leaves it unrecorded (e.g. on a DDP rank other than 0)."""
    from medmerge.manifest import write_json_atomic

    path = Path(folder) / record
    found = recorded(path)
    if found is not None and found["key"] == key:
        return found, True
    path.unlink(missing_ok=True)
    payload = fn()
    done = {"key": key, "step": label, **(payload or {})}
    if payload is not None:
        write_json_atomic(path, done)
    return done, False
