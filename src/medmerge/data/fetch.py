"""`medmerge data fetch NAME`: download a public dataset into the cache and verify its checksum.

Offline, or when a download fails, the error says to pass `--from PATH` (a local copy, which is verified
and copied into the cache the same way).
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medmerge.errors import MedmergeError
from medmerge.manifest import sha256_file
from medmerge.models import cache_root


@dataclass(frozen=True)
class Source:
    url: str
    filename: str
    sha256: str
    licence: str


SOURCES: dict[str, Source] = {
    "medquad": Source(
        url="https://github.com/abachaa/MedQuAD/archive/refs/heads/master.zip",
        filename="MedQuAD-master.zip",
        sha256="7105a55b850f6b585068918d1ee332cca0b2fa597556fc2c0cfe23b667426a99",
        licence="CC BY 4.0 (Ben Abacha & Demner-Fushman, BMC Bioinformatics 2019)",
    ),
    "genmedgpt": Source(
        url="https://raw.githubusercontent.com/Kent0n-Li/ChatDoctor/main/chatdoctor5k.json",
        filename="chatdoctor5k.json",
        sha256="780c1a6aa67d461359ac220c120134429290b1e340545c3ad8954e1aa235d80f",
        licence="Apache-2.0",
    ),
    "pubmedqa": Source(
        url="https://raw.githubusercontent.com/pubmedqa/pubmedqa/master/data/ori_pqal.json",
        filename="pubmedqa_ori_pqal.json",
        sha256="8b3276be8942ebbd77f3ddcda12c1749bf0e490045a736fd8438ee40cf37a41d",
        licence="MIT",
    ),
}


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise MedmergeError(f"dataset {name!r} cannot be fetched (choices: {', '.join(SOURCES)})")
    return SOURCES[name]


def fetched_path(name: str) -> Path:
    """Where `fetch(name)` puts the dataset; a one-line error if it is not there yet."""
    path = cache_root() / "datasets" / _source(name).filename
    if not path.is_file():
        raise MedmergeError(
            f"dataset {name!r} is not in the cache ({path}); run `medmerge data fetch {name}` "
            f"or give its path: {name}:PATH"
        )
    return path


def fetch(name: str, from_path: str | Path | None = None, timeout_s: float = 30.0) -> Path:
    """Download (or copy from `from_path`) dataset `name` into the cache, verifying its SHA-256."""
    source = _source(name)
    target = cache_root() / "datasets" / source.filename
    if target.is_file() and sha256_file(target) == source.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{source.filename}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            if from_path is not None:
                with open(from_path, "rb") as src:
                    shutil.copyfileobj(src, tmp)
            else:
                try:
                    with urllib.request.urlopen(source.url, timeout=timeout_s) as response:
                        shutil.copyfileobj(response, tmp)
                except OSError as exc:
                    raise MedmergeError(
                        f"cannot download {name} from {source.url} ({exc}); offline? "
                        f"pass --from PATH with a local copy of {source.filename}"
                    ) from exc
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    digest = sha256_file(tmp_path)
    if digest != source.sha256:
        tmp_path.unlink(missing_ok=True)
        origin = from_path or source.url
        raise MedmergeError(
            f"{origin}: SHA-256 {digest[:16]}… does not match the expected {source.sha256[:16]}…"
        )
    tmp_path.replace(target)
    return target
