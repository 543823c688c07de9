"""Atomic output folders, checksums and manifests: nothing half-written ever looks complete.

Every output folder medmerge writes is built under a temporary sibling name and renamed into place
only when complete, and carries a manifest (JSON) of its inputs, config, package versions and checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

_VERSIONED = ("medmerge", "torch", "transformers", "peft", "safetensors", "tokenizers", "numpy", "gguf")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_dir(
    path: str | Path, suffixes: tuple[str, ...] | None = None, exclude: frozenset[str] = frozenset()
) -> str:
    """Hex SHA-256 over (relative name, file digest) of every file below `path`, in sorted order.

    `suffixes` restricts it to files ending in one of them (e.g. weights only); files named in
    `exclude` are skipped.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        if (suffixes and not file.name.endswith(suffixes)) or file.name in exclude:
            continue
        digest.update(str(file.relative_to(root)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


# medmerge's own records inside a model folder: when and where it was made, not what it computes
PROVENANCE_FILES = frozenset(
    {
        "manifest.json",
        "medmerge-model.json",
        "medmerge-step.json",
        "medmerge-statistics.json",
        "medmerge-export.json",
        "merge.json",
    }
)
# a site's shareable statistics beside its expert (medmerge.site_stats): about the data, not the weights
STATISTICS_FILES = frozenset({"statistics.safetensors", "statistics.json"})


def checksum(path: str | Path) -> str:
    """SHA-256 of a file, or of the weight and config files of a model folder.

    medmerge's provenance records (PROVENANCE_FILES: timestamps, paths) are left out, so a model
    rebuilt bit for bit (e.g. the embedded model dequantized again) keeps its checksum and every
    cached step keyed by it; so are site statistics (STATISTICS_FILES), which describe the data.
    """
    path = Path(path)
    if path.is_dir():
        suffixes = (".safetensors", ".json", ".gguf", ".bin")
        return sha256_dir(path, suffixes=suffixes, exclude=PROVENANCE_FILES | STATISTICS_FILES)
    return sha256_file(path)


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide numbers in medmerge's outputs."""
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def build_manifest(kind: str, *, inputs: dict[str, Any], config: Any, **extra: Any) -> dict[str, Any]:
    """The manifest every output folder carries: what made it, from what, with which versions."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return {
        "kind": kind,
        "created_unix": round(time.time(), 3),
        "inputs": inputs,
        "config": config,
        "versions": versions(),
        **extra,
    }


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` only if the block succeeds.

    A crash (or Ctrl-C) leaves at most a hidden `.final.tmp-*` folder, never a half-written `final`.
    An existing `final` is refused unless `overwrite`, in which case it is replaced in one rename step.
    """
    from medmerge.errors import MedmergeError

    final = Path(final)
    if final.exists() and not overwrite:
        raise MedmergeError(f"{final}: output already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
