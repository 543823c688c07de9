"""SHA-256 of the merge inputs' weight files, cached across merges by (path, size, mtime, inode)."""

from __future__ import annotations

import json
from pathlib import Path

from medmerge.manifest import sha256_file, write_json_atomic
from medmerge.merge.sources import Source


def cached_sha256(path: Path) -> str:
    """SHA-256 of a weight file, cached in $MEDMERGE_CACHE/checksums.json under (path, size, mtime, inode).

    Merge searches merge the same experts many times; each file is hashed once while it is unchanged.
    """
    from medmerge.models import cache_root

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    cache_file = cache_root() / "checksums.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_file(path)
        try:
            fresh = json.loads(cache_file.read_text())  # keep what other processes added meanwhile
        except (OSError, json.JSONDecodeError):
            fresh = {}
        write_json_atomic(cache_file, {**fresh, key: cache[key]})
    return cache[key]


def input_checksums(sources: list[Source], base: Source | None) -> dict[str, str]:
    """{weight file: SHA-256} of every input (and the base), sorted by path."""
    files = sorted({f for s in ([base] if base else []) + sources for f in s.weight_files()})
    return {str(f): cached_sha256(f) for f in files}
