"""SPEC parsing and `data fetch`: offline failure says --from; --from verifies the checksum."""

from __future__ import annotations

import urllib.request

import pytest

from medmerge.data import load_dataset, parse_spec
from medmerge.data.fetch import SOURCES, fetch, fetched_path
from medmerge.errors import MedmergeError


def test_parse_spec():
    spec = parse_spec("jsonl:data/x.jsonl?question=prompt&answer=response")
    assert (spec.kind, str(spec.path), spec.options) == (
        "jsonl",
        "data/x.jsonl",
        {"question": "prompt", "answer": "response"},
    )
    assert spec.text == "jsonl:data/x.jsonl?answer=response&question=prompt"
    assert parse_spec("medquad").path is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "mystery:x",
            r"unknown kind 'mystery' \(choices: medquad, icliniq, genmedgpt, pubmedqa, jsonl, csv\)",
        ),
        ("csv:x.csv?q=a", r"unknown option\(s\) \['q'\] for csv \(choices: answer, group, id, question\)"),
        ("medquad:x?question=a", r"unknown option\(s\) \['question'\] for medquad \(choices: collections\)"),
        ("jsonl:", "jsonl needs a file path"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(MedmergeError, match=message):
        parse_spec(spec)


def test_fetch_offline_says_to_pass_from(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(MedmergeError, match=r"cannot download pubmedqa .*pass --from PATH"):
        fetch("pubmedqa")


def test_fetch_from_local_copy_verifies_and_caches(shared_datasets, tmp_path):
    with pytest.raises(MedmergeError, match="is not in the cache"):
        fetched_path("pubmedqa")
    path = fetch("pubmedqa", from_path=shared_datasets / "pubmedqa_ori_pqal.json")
    assert path == fetched_path("pubmedqa")
    assert len(load_dataset("pubmedqa")) == 1000  # a bare KIND reads the fetched copy
    wrong = tmp_path / "wrong.json"
    wrong.write_text("{}")
    with pytest.raises(MedmergeError, match="does not match the expected"):
        fetch("genmedgpt", from_path=wrong)
    assert not any(p.name.startswith(".chatdoctor5k") for p in path.parent.iterdir())  # no temp file left


def test_unknown_fetch_name():
    with pytest.raises(MedmergeError, match=f"choices: {', '.join(SOURCES)}"):
        fetch("icliniq")
