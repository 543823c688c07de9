"""Cached, resumable steps: a step's folder is fresh when its recorded key equals the key it would get.

A key is the SHA-256 of the canonical JSON of everything the step depends on: its own settings and the
keys of the steps it reads. Changing a setting changes the keys downstream of it, and only those.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

STEP_FILE = "medmerge-step.json"


def step_key(**parts: Any) -> str:
    """SHA-256 of the canonical JSON of `parts` (sorted keys; pydantic models dumped as JSON)."""

    def plain(value: Any) -> Any:
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json", by_alias=True)
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"not JSON-serialisable in a step key: {type(value).__name__}")

    text = json.dumps(parts, sort_keys=True, default=plain, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def is_fresh(folder: Path, key: str) -> bool:
    """True when `folder` was completed by a step with this `key` (its step file says so)."""
    record = folder / STEP_FILE
    if not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("key") == key
    except json.JSONDecodeError:
        return False


def mark_done(folder: Path, key: str, **info: Any) -> None:
    """Record in `folder` that the step with `key` completed (written last, atomically)."""
    from medmerge.manifest import write_json_atomic

    write_json_atomic(folder / STEP_FILE, {"key": key, **info})
