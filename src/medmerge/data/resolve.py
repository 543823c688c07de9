"""Where a bare dataset name (`medquad`, `genmedgpt`, `pubmedqa`) is read from, in this order:

1. the folders of `$MEDMERGE_DATA` (one or more, `:`-separated), holding the publisher's files
   (MedQuAD-master.zip, chatdoctor5k.json, pubmedqa_ori_pqal.json);
2. the folders registered in `<venv>/medmerge-data-mirrors.txt` (one a line): `scripts/setup.sh` writes
   `../shared/datasets` there when the checkout has that folder beside it;
3. the cache, `$MEDMERGE_CACHE/datasets` (what `medmerge data fetch` writes);
4. a download into the cache, SHA-256 verified (`medmerge.data.fetch`); `MEDMERGE_OFFLINE=1` skips it.

Nothing found is one line naming the dataset, the folders searched and the two ways out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from medmerge.data.fetch import SOURCES, DownloadError, Source, fetch, source_of
from medmerge.data.kinds import DATASET_KINDS
from medmerge.data.records import Dataset
from medmerge.data.specs import DataSpec, parse_spec
from medmerge.errors import MedmergeError
from medmerge.manifest import sha256_dir, sha256_file
from medmerge.models import cache_root

MIRRORS_FILE = "medmerge-data-mirrors.txt"


def registered_mirrors() -> list[Path]:
    """Folders listed in `sys.prefix/medmerge-data-mirrors.txt` (blank lines and `#` comments ignored)."""
    try:
        lines = (Path(sys.prefix) / MIRRORS_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def search_folders() -> list[tuple[Path, str]]:
    """(folder, why it is searched) for every local folder, in search order."""
    variable = os.environ.get("MEDMERGE_DATA", "")
    folders = [(Path(p).expanduser(), "MEDMERGE_DATA") for p in variable.split(os.pathsep) if p.strip()]
    folders += [(folder, "registered mirror") for folder in registered_mirrors()]
    folders.append((cache_root() / "datasets", "cache"))
    return folders


def find_local(source: Source) -> Path | None:
    """The first file of `source` (under any of its names) in the search folders, or None."""
    for folder, _ in search_folders():
        for filename in source.names:
            if (folder / filename).is_file():
                return folder / filename
    return None


def not_found_message(name: str, source: Source, reason: str) -> str:
    """The one-line error for a dataset found nowhere: what was searched, why no download, what to do."""
    searched = ", ".join(f"{folder} ({why})" for folder, why in search_folders())
    if not os.environ.get("MEDMERGE_DATA", "").strip():
        searched = f"MEDMERGE_DATA (unset), {searched}"
    return (
        f"dataset {name!r} not found: no {source.filename} in {searched}, and no download ({reason}); "
        f"set MEDMERGE_DATA=FOLDER (a folder holding {source.filename}) "
        f"or run `medmerge data fetch {name} --from FILE`"
    )


def resolve_dataset(name: str) -> Path:
    """The file of public dataset `name`: a local mirror, the cache, else a verified download."""
    source = source_of(name)
    local = find_local(source)
    if local is not None:
        return local
    try:
        return fetch(name)
    except DownloadError as exc:
        raise MedmergeError(not_found_message(name, source, exc.reason)) from exc


def spec_path(spec: str | DataSpec) -> Path:
    """The file or folder a SPEC reads: its PATH, or where its bare public name resolves."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    return parsed.path if parsed.path is not None else resolve_dataset(parsed.kind)


def spec_checksum(spec: str | DataSpec) -> str | None:
    """SHA-256 of a SPEC's file (or of every file of its folder), bare names resolved; None where a
    given PATH does not exist."""
    path = spec_path(spec)
    if not path.exists():
        return None
    return sha256_dir(path) if path.is_dir() else sha256_file(path)


def load_dataset(spec: str | DataSpec) -> Dataset:
    """Load every answered pair of a dataset SPEC (see `medmerge.data.specs`)."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    path = spec_path(parsed)
    if not path.exists():
        hint = f"; or use the bare name {parsed.kind!r}" if parsed.kind in SOURCES else ""
        raise MedmergeError(f"{path}: no such file or folder (dataset SPEC {parsed.text!r}){hint}")
    dataset = DATASET_KINDS[parsed.kind].loader(path, **parsed.options)
    dataset.spec = parsed.text
    if not dataset.pairs:
        skipped = ", ".join(f"{k}={v}" for k, v in dataset.skipped.items()) or "nothing readable"
        raise MedmergeError(f"{path}: no answered question/answer pairs found ({skipped})")
    return dataset
