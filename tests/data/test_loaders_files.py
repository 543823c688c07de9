"""Loaders on small hand-written files in each publisher's format, including bad input."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest

from medmerge.data import load_dataset
from medmerge.errors import MedmergeError

MEDQUAD_DOC = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="{doc}" source="GHR" url="https://example.org/{doc}">
<Focus>{focus}</Focus>
<QAPairs>
  <QAPair pid="1">
    <Question qid="{doc}-1" qtype="information">What is (are)   {focus} ?</Question>
    <Answer>{focus} is a
      condition &amp; more.</Answer>
  </QAPair>
  <QAPair pid="2">
    <Question qid="{doc}-2" qtype="treatment">How to treat {focus} ?</Question>
    <Answer></Answer>
  </QAPair>
</QAPairs>
</Document>
"""


def write_medquad(root: Path, broken: bool = True) -> Path:
    folder = root / "MedQuAD-master" / "3_GHR_QA"
    folder.mkdir(parents=True)
    (folder / "0000001.xml").write_text(MEDQUAD_DOC.format(doc="0000001", focus="Gout"))
    (folder / "0000002.xml").write_text(MEDQUAD_DOC.format(doc="0000002", focus="Asthma"))
    if broken:
        (folder / "0000003.xml").write_text("<Document id='3'><Focus>Oops</Focus><QAPairs>")  # truncated
    return root / "MedQuAD-master"


def test_medquad_folder_and_zip_agree(tmp_path, caplog):
    folder = write_medquad(tmp_path)
    archive = tmp_path / "MedQuAD-master.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in sorted(folder.rglob("*.xml")):
            z.write(file, file.relative_to(tmp_path))
    with caplog.at_level(logging.WARNING, logger="medmerge.data"):
        from_folder = load_dataset(f"medquad:{folder}")
        from_zip = load_dataset(f"medquad:{archive}")
    assert [p.question for p in from_folder.pairs] == ["What is (are) Gout ?", "What is (are) Asthma ?"]
    assert [p.answer for p in from_zip.pairs] == [
        "Gout is a condition & more.",
        "Asthma is a condition & more.",
    ]
    assert [(p.focus, p.qtype, p.doc_id) for p in from_zip.pairs] == [
        ("Gout", "information", "3_GHR_QA/0000001"),
        ("Asthma", "information", "3_GHR_QA/0000002"),
    ]
    for ds in (from_folder, from_zip):  # one bad document: skipped, counted, warned about — never silently
        assert ds.skipped["malformed_document"] == 1
        assert ds.skipped["unanswered:3_GHR_QA"] == 2
        assert len(ds.bad_files) == 1 and "0000003.xml" in ds.bad_files[0]
    assert sum("0000003.xml" in r.getMessage() for r in caplog.records) == 2


def test_medquad_with_no_documents_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedmergeError, match=r"empty: no MedQuAD XML documents found"):
        load_dataset(f"medquad:{tmp_path / 'empty'}")


def test_medquad_all_documents_malformed_is_an_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.xml").write_text("<Document><unclosed>")
    with pytest.raises(
        MedmergeError, match=r"no answered question/answer pairs found \(malformed_document=1\)"
    ):
        load_dataset(f"medquad:{tmp_path}")


def test_not_a_zip(tmp_path):
    bogus = tmp_path / "m.zip"
    bogus.write_text("hello")
    with pytest.raises(MedmergeError, match="m.zip: not a zip archive"):
        load_dataset(f"medquad:{bogus}")


ICLINIQ = [
    {"input": "Hi doctor, I have a rash.", "answer_icliniq": "Hi. Use a mild steroid cream.",
     "answer_chatgpt": "gpt", "answer_chatdoctor": "cd"},
    {"input": "My knee hurts when I run.", "answer_icliniq": "  ",
     "answer_chatgpt": "g", "answer_chatdoctor": "c"},
    {"input": "Fever for two days.", "answer_icliniq": "Take paracetamol\nand rest.",
     "answer_chatgpt": "g", "answer_chatdoctor": "c"},
]  # fmt: skip


def test_icliniq_targets_the_doctors_answer(tmp_path):
    path = tmp_path / "iCliniq.json"
    path.write_text(json.dumps(ICLINIQ))
    ds = load_dataset(f"icliniq:{path}")
    assert [(p.id, p.question, p.answer) for p in ds.pairs] == [
        ("icliniq/0", "Hi doctor, I have a rash.", "Hi. Use a mild steroid cream."),
        ("icliniq/2", "Fever for two days.", "Take paracetamol and rest."),
    ]
    assert ds.skipped == {"empty_answer": 1}


@pytest.mark.parametrize(
    ("kind", "payload", "message"),
    [
        ("icliniq", [{"input": "q", "answer": "a"}], r"record 0 lacks field\(s\) \['answer_icliniq'"),
        (
            "genmedgpt",
            [{"instruction": "i", "question": "q", "output": "o"}],
            r"record 0 lacks field\(s\) \['input'\]",
        ),
        ("genmedgpt", {"input": "q"}, "expected a JSON list of GenMedGPT objects, found dict"),
        ("pubmedqa", [1, 2], "expected a JSON object keyed by PubMed id"),
        ("pubmedqa", {"123": {"QUESTION": "q"}}, "entry '123' lacks QUESTION/LONG_ANSWER"),
    ],
)
def test_json_with_wrong_fields_names_file_and_expectation(tmp_path, kind, payload, message):
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(MedmergeError, match=message) as err:
        load_dataset(f"{kind}:{path}")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["icliniq", "genmedgpt", "pubmedqa", "jsonl", "csv"])
def test_empty_file(tmp_path, kind):
    path = tmp_path / f"data.{kind}"
    path.write_text("")
    with pytest.raises(MedmergeError, match=r"file is empty"):
        load_dataset(f"{kind}:{path}")


def test_invalid_json_reports_line(tmp_path):
    path = tmp_path / "g.json"
    path.write_text('[{"instruction": "i",\n "input": "q" "output": "o"}]')
    with pytest.raises(MedmergeError, match=r"g.json: invalid JSON at line 2"):
        load_dataset(f"genmedgpt:{path}")


def test_jsonl_and_csv_with_configurable_columns(tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(
        '{"prompt": "What is gout?", "response": "Arthritis.", "uid": "a1"}\n\n'
        '{"prompt": "What is acne?", "response": "A skin condition.", "uid": "a2"}\n'
    )
    ds = load_dataset(f"jsonl:{jsonl}?question=prompt&answer=response&id=uid")
    assert [(p.id, p.question, p.answer, p.source) for p in ds.pairs] == [
        ("mine/a1", "What is gout?", "Arthritis.", "mine"),
        ("mine/a2", "What is acne?", "A skin condition.", "mine"),
    ]
    table = tmp_path / "mine.csv"
    table.write_text('question,answer\n"What is gout, really?",Arthritis.\nWhat is acne?,A skin condition.\n')
    ds = load_dataset(f"csv:{table}")
    assert [(p.id, p.question) for p in ds.pairs] == [
        ("mine/2", "What is gout, really?"),
        ("mine/3", "What is acne?"),
    ]


def test_table_missing_column_lists_found_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("q,a\nhello,world\n")
    with pytest.raises(
        MedmergeError, match=r"x.csv:2: missing column\(s\) \['question', 'answer'\]; columns found"
    ):
        load_dataset(f"csv:{path}")


def test_jsonl_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(MedmergeError, match=r"x.jsonl:2: invalid JSON"):
        load_dataset(f"jsonl:{path}")
