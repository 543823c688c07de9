"""`medquad?collections=A,B`: only the named MedQuAD source collections, from a folder or the zip, so
one MedQuAD file can stand for several institutions; an unknown collection is a one-line error."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from medmerge.data import load_dataset
from medmerge.data.specs import parse_spec
from medmerge.errors import MedmergeError

DOC = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="{doc}" source="x" url="https://example.org/{doc}">
<Focus>{focus}</Focus>
<QAPairs>
  <QAPair pid="1">
    <Question qid="{doc}-1" qtype="information">What is {focus} ?</Question>
    <Answer>{focus} is a condition.</Answer>
  </QAPair>
</QAPairs>
</Document>
"""
COLLECTIONS = {"1_CancerGov_QA": ["Melanoma"], "3_GHR_QA": ["Gout", "Asthma"], "9_CDC_QA": ["Flu"]}


def write_medquad(root: Path) -> Path:
    for collection, focuses in COLLECTIONS.items():
        (root / collection).mkdir(parents=True)
        for i, focus in enumerate(focuses):
            (root / collection / f"{i:07d}.xml").write_text(DOC.format(doc=f"{collection}{i}", focus=focus))
    archive = root.parent / "MedQuAD-master.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in sorted(root.rglob("*.xml")):
            z.write(file, f"MedQuAD-master/{file.relative_to(root)}")
    return archive


def focuses(spec: str) -> list[str]:
    return sorted(p.question.split()[-2] for p in load_dataset(spec).pairs)


def test_collections_keep_only_the_named_sources(tmp_path):
    archive = write_medquad(tmp_path / "MedQuAD-master")
    for path in (tmp_path / "MedQuAD-master", archive):
        assert focuses(f"medquad:{path}") == ["Asthma", "Flu", "Gout", "Melanoma"]
        assert focuses(f"medquad:{path}?collections=3_GHR_QA") == ["Asthma", "Gout"]
        both = f"medquad:{path}?collections=9_CDC_QA,1_CancerGov_QA"
        assert focuses(both) == ["Flu", "Melanoma"]
        assert {p.id.split("/")[1] for p in load_dataset(both).pairs} == {"9_CDC_QA", "1_CancerGov_QA"}
    assert parse_spec("medquad?collections=3_GHR_QA").text == "medquad?collections=3_GHR_QA"


def test_unknown_collection_is_one_line(tmp_path):
    archive = write_medquad(tmp_path / "MedQuAD-master")
    with pytest.raises(
        MedmergeError, match=r"no MedQuAD collection\(s\) \['2_Nope'\] \(there are: 1_Can"
    ) as e:
        load_dataset(f"medquad:{archive}?collections=3_GHR_QA,2_Nope")
    assert "\n" not in str(e.value)
