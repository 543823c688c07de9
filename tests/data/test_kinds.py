"""The one table of dataset kinds is complete: every kind has a loader, its docs line and a fixture that
its loader reads; SPEC parsing and `medmerge data fetch` take their kinds, options and sources from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medmerge.data import DATASET_KINDS, KINDS, load_dataset, parse_spec
from medmerge.data.fetch import SOURCES
from medmerge.errors import MedmergeError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
FIXTURES = Path(__file__).parent / "fixtures" / "kinds"


def _docs_rows() -> dict[str, str]:
    """{kind: its row} of the table in docs/architecture.md's section "Dataset kinds"."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Dataset kinds", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|.*$", section, re.MULTILINE)}


def _fixture(kind: str) -> Path:
    found = sorted(FIXTURES.glob(f"{kind}*"))
    assert len(found) == 1, f"tests/data/fixtures/kinds: expected one fixture named {kind}*, found {found}"
    return found[0]


@pytest.mark.parametrize("kind", list(DATASET_KINDS))
def test_every_kind_has_a_loader_a_docs_line_and_a_fixture(kind: str) -> None:
    entry = DATASET_KINDS[kind]
    assert entry.name == kind and callable(entry.loader)
    row = _docs_rows().get(kind)
    assert row is not None, f"docs/architecture.md: no row for dataset kind {kind} in 'Dataset kinds'"
    for option in entry.options:
        assert f"`{option}`" in row, f"docs/architecture.md: the row of {kind} does not name option {option}"
    dataset = load_dataset(f"{kind}:{_fixture(kind)}")
    assert dataset.pairs and all(p.question and p.answer for p in dataset.pairs)


def test_the_docs_table_lists_exactly_the_kinds() -> None:
    assert list(_docs_rows()) == list(DATASET_KINDS) == list(KINDS)


def test_spec_options_are_the_loaders_keyword_parameters() -> None:
    assert DATASET_KINDS["medquad"].options == {"collections"}
    assert (
        DATASET_KINDS["jsonl"].options
        == DATASET_KINDS["csv"].options
        == {"question", "answer", "id", "group"}
    )
    for kind, entry in DATASET_KINDS.items():
        path = "" if entry.source is not None else "f"
        for option in entry.options:
            assert parse_spec(f"{kind}:{path}?{option}=x").options == {option: "x"}
        with pytest.raises(MedmergeError, match=f"unknown option\\(s\\) \\['nope'\\] for {kind}"):
            parse_spec(f"{kind}:{path}?nope=x")


def test_fetchable_datasets_are_the_kinds_with_a_source() -> None:
    assert SOURCES == {k: e.source for k, e in DATASET_KINDS.items() if e.source is not None}
    assert list(SOURCES) == ["medquad", "genmedgpt", "pubmedqa"]
    with pytest.raises(MedmergeError, match="jsonl needs a file path"):
        parse_spec("jsonl")
    assert parse_spec("icliniq").path is None  # a bare icliniq parses; resolving it is the error
