"""`medmerge data fetch NAME`: download a public dataset into the cache and verify its checksum.

Every download is pinned to a commit, never a branch, so its checksum cannot go stale. MedQuAD comes as
GitHub's archive of that commit (top folder `MedQuAD-<commit>/`); its checksum is over the archive's
content (`archive_digest`: each file's path below the top folder and SHA-256), so the publisher's branch
archive of the same commit (`MedQuAD-master/`, the copy most people have) verifies as well.

Offline, or when a download fails, the error says to pass `--from PATH` (a local copy, which is verified
and copied into the cache the same way). `medmerge.data.resolve` decides when to download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO

from medmerge.data.kinds import DATASET_KINDS, Source
from medmerge.errors import MedmergeError
from medmerge.manifest import sha256_file
from medmerge.models import cache_root

SOURCES: dict[str, Source] = {k.name: k.source for k in DATASET_KINDS.values() if k.source is not None}


def archive_digest(path: str | Path) -> str:
    """Hex SHA-256 over (path below the common top folder, SHA-256) of every file in a zip, sorted.

    It ignores the top folder's name, compression and timestamps, so a commit's branch and commit
    archives agree. A file that is not a zip is a one-line error.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise MedmergeError(f"{path}: not a readable zip archive ({exc})") from exc
    with archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        strip = len({n.split("/", 1)[0] for n in names}) == 1 and all("/" in n for n in names)
        digest = hashlib.sha256()
        for relative, name in sorted((n.split("/", 1)[1] if strip else n, n) for n in names):
            digest.update(f"{relative}\0{hashlib.sha256(archive.read(name)).hexdigest()}\n".encode())
    return digest.hexdigest()


def source_digest(source: Source, path: str | Path) -> str:
    """The checksum of `path` that `source.sha256` pins (file bytes, or archive content)."""
    return archive_digest(path) if source.archive else sha256_file(path)


def source_of(name: str) -> Source:
    """The `Source` of a fetchable dataset; a one-line error listing the choices."""
    if name not in SOURCES:
        raise MedmergeError(f"dataset {name!r} cannot be fetched (choices: {', '.join(SOURCES)})")
    return SOURCES[name]


def fetched_path(name: str) -> Path:
    """Where `fetch(name)` puts the dataset; a one-line error if it is not there yet."""
    path = cache_root() / "datasets" / source_of(name).filename
    if not path.is_file():
        raise MedmergeError(
            f"dataset {name!r} is not in the cache ({path}); run `medmerge data fetch {name}` "
            f"or give its path: {name}:PATH"
        )
    return path


class DownloadError(MedmergeError):
    """A download that could not be tried or failed; `reason` says why in a few words."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def offline_reason() -> str | None:
    """Why no download may be tried (`MEDMERGE_OFFLINE=1` or `HF_HUB_OFFLINE=1`), or None."""
    for variable in ("MEDMERGE_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"offline: {variable}={os.environ[variable]}"
    return None


def _download(name: str, source: Source, out: BinaryIO, timeout_s: float) -> None:
    """Copy `source.url` into `out`; offline or a failed download is a one-line error saying --from."""
    reason = offline_reason()
    try:
        if reason is not None:
            raise OSError(reason)
        with urllib.request.urlopen(source.url, timeout=timeout_s) as response:
            shutil.copyfileobj(response, out)
    except OSError as exc:
        raise DownloadError(
            f"cannot download {name} from {source.url} ({exc}); offline? "
            f"pass --from PATH with a local copy of {source.filename}",
            reason=str(exc) if reason else f"{source.url}: {exc}",
        ) from exc


def _copy(from_path: str | Path, out: BinaryIO) -> None:
    """Copy a local file into `out`; a missing or unreadable file is a one-line error."""
    try:
        with open(from_path, "rb") as src:
            shutil.copyfileobj(src, out)
    except OSError as exc:
        reason = exc.strerror or exc
        raise MedmergeError(f"{from_path}: cannot read ({reason}); expected a dataset file") from exc


def fetch(name: str, from_path: str | Path | None = None, timeout_s: float = 30.0) -> Path:
    """Download (or copy from `from_path`) dataset `name` into the cache, verifying its SHA-256."""
    source = source_of(name)
    target = cache_root() / "datasets" / source.filename
    if target.is_file() and source_digest(source, target) == source.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{source.filename}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with open(tmp_path, "wb") as out:
            if from_path is not None:
                _copy(from_path, out)
            else:
                _download(name, source, out, timeout_s)
        digest = source_digest(source, tmp_path)
        if digest != source.sha256:
            raise MedmergeError(
                f"{from_path or source.url}: SHA-256 {digest[:16]}… does not match the expected "
                f"{source.sha256[:16]}… ({source.filename})"
            )
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    tmp_path.replace(target)
    return target
