"""Bare dataset names: $MEDMERGE_DATA, then the registered mirror, then the cache, then a verified
download; found nowhere, one line that names the folders searched and the two ways out."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import urllib.request
import zipfile
from dataclasses import replace

import pytest

from medmerge.data import load_dataset, parse_spec
from medmerge.data.fetch import SOURCES, archive_digest, fetch
from medmerge.data.resolve import MIRRORS_FILE, resolve_dataset, spec_checksum
from medmerge.errors import MedmergeError
from medmerge.manifest import sha256_file
from medmerge.models import cache_root

PUBMEDQA = {"1": {"QUESTION": "Does it work?", "LONG_ANSWER": "Yes.", "final_decision": "yes"}}


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """No MEDMERGE_DATA, no registered mirror (a bare sys.prefix), an empty cache, no network."""
    monkeypatch.delenv("MEDMERGE_DATA", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("MEDMERGE_OFFLINE", "1")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setenv("MEDMERGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "venv").mkdir()
    return tmp_path


def _mirror(folder, payload=PUBMEDQA):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pubmedqa_ori_pqal.json").write_text(json.dumps(payload))
    return folder


def test_bare_specs_parse_with_and_without_options():
    assert parse_spec("pubmedqa").path is None and parse_spec("pubmedqa").text == "pubmedqa"
    assert parse_spec("medquad:").path is None
    with pytest.raises(MedmergeError, match=r"unknown option\(s\) \['x'\] for medquad"):
        parse_spec("medquad?x=1")


def test_offline_and_nowhere_is_one_line_with_both_ways_out(clean):
    with pytest.raises(MedmergeError) as err:
        load_dataset("medquad")
    cache = clean / "cache" / "datasets"
    assert str(err.value) == (
        f"dataset 'medquad' not found: no MedQuAD-master.zip in MEDMERGE_DATA (unset), {cache} (cache), "
        "and no download (offline: MEDMERGE_OFFLINE=1); set MEDMERGE_DATA=FOLDER (a folder holding "
        "MedQuAD-master.zip) or run `medmerge data fetch medquad --from FILE`"
    )


def test_failed_download_names_the_url(clean, monkeypatch):
    monkeypatch.delenv("MEDMERGE_OFFLINE")

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(MedmergeError, match=r"no download \(https://raw\.githubusercontent\.com/pubmedqa/.*"
                       r"Name or service not known\); set MEDMERGE_DATA=FOLDER"):  # fmt: skip
        resolve_dataset("pubmedqa")


def test_order_data_then_registered_then_cache(clean, monkeypatch):
    cached = fetch("pubmedqa", from_path=_local_pubmedqa(clean, monkeypatch))
    assert resolve_dataset("pubmedqa") == cached
    registered = _mirror(clean / "registered")
    (clean / "venv" / MIRRORS_FILE).write_text(f"# written by setup.sh\n{registered}\n")
    assert resolve_dataset("pubmedqa") == registered / "pubmedqa_ori_pqal.json"
    first, second = clean / "empty", _mirror(clean / "data")
    first.mkdir()
    monkeypatch.setenv("MEDMERGE_DATA", f"{first}:{second}")
    assert resolve_dataset("pubmedqa") == second / "pubmedqa_ori_pqal.json"
    assert len(load_dataset("pubmedqa")) == 1
    file = second / "pubmedqa_ori_pqal.json"
    assert spec_checksum("pubmedqa") == spec_checksum(f"pubmedqa:{file}") == sha256_file(file)
    assert spec_checksum(f"pubmedqa:{clean / 'missing.json'}") is None


def _local_pubmedqa(clean, monkeypatch):
    """A tiny PubMedQA file, with the pinned checksum swapped for its own."""
    path = _mirror(clean / "local") / "pubmedqa_ori_pqal.json"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(SOURCES, "pubmedqa", replace(SOURCES["pubmedqa"], sha256=digest))
    return path


def test_download_when_found_nowhere(clean, monkeypatch):
    monkeypatch.delenv("MEDMERGE_OFFLINE")
    payload = json.dumps(PUBMEDQA).encode()
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(SOURCES, "pubmedqa", replace(SOURCES["pubmedqa"], sha256=digest))
    urls = []

    def serve(url, timeout):
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    assert resolve_dataset("pubmedqa") == cache_root() / "datasets" / "pubmedqa_ori_pqal.json"
    assert urls == [SOURCES["pubmedqa"].url] and "/master/" not in urls[0]


def test_medquad_is_pinned_to_a_commit_archive():
    assert SOURCES["medquad"].url.endswith("/archive/577bd37b96c02d1833b2c9eed2de9f96964e96cb.zip")


def test_archive_digest_ignores_the_top_folder(tmp_path):
    for top in ("MedQuAD-master", "MedQuAD-577bd37"):
        with zipfile.ZipFile(tmp_path / f"{top}.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{top}/", "")
            z.writestr(f"{top}/1_C/1.xml", "<Document/>")
    assert archive_digest(tmp_path / "MedQuAD-master.zip") == archive_digest(tmp_path / "MedQuAD-577bd37.zip")


def test_fetch_medquad_from_the_branch_archive_verifies(shared_datasets, clean):
    path = fetch("medquad", from_path=shared_datasets / "MedQuAD-master.zip")
    assert resolve_dataset("medquad") == path
