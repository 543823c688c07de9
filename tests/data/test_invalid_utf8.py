"""Undecodable bytes in any text input: a one-line error naming the file and the byte offset, or, for
one MedQuAD document among many, a counted skip with the reason. Never a traceback."""

from __future__ import annotations

import json
import re
import zipfile

import pytest

from medmerge.data import load_dataset
from medmerge.errors import MedmergeError
from tests.data.test_loaders_files import MEDQUAD_DOC

BAD = b"\xff"  # never valid in UTF-8


def _json_bytes(payload: object, field: str) -> bytes:
    """`payload` as JSON with the invalid byte spliced into the first value of `field`."""
    text = json.dumps(payload, indent=1).encode()
    marker = f'"{field}": "'.encode()
    at = text.index(marker) + len(marker)
    return text[:at] + BAD + text[at:]


GENMEDGPT = [{"instruction": "i", "input": "Fever?", "output": "Rest."}]
ICLINIQ = [{"input": "Rash?", "answer_icliniq": "Cream.", "answer_chatgpt": "g", "answer_chatdoctor": "c"}]
PUBMEDQA = {"123": {"QUESTION": "Does it work?", "LONG_ANSWER": "Yes.", "final_decision": "yes"}}

JSONL_OK = b'{"question": "q", "answer": "a"}\n'
CASES = [
    ("genmedgpt", "chatdoctor5k.json", _json_bytes(GENMEDGPT, "output"), "JSON"),
    ("icliniq", "iCliniq.json", _json_bytes(ICLINIQ, "answer_icliniq"), "JSON"),
    ("pubmedqa", "ori_pqal.json", _json_bytes(PUBMEDQA, "LONG_ANSWER"), "JSON"),
    ("jsonl", "mine.jsonl", JSONL_OK + b'{"question": "\xc3(", "answer": "a"}\n', "JSONL"),
    ("csv", "mine.csv", b"question,answer\nq,a\nq2,caf\xe9\n", "CSV"),
    ("jsonl", "bom.jsonl", b'\xef\xbb\xbf{"question": "q", "answer": "\xff"}\n', "JSONL"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "name", "raw", "what"), CASES, ids=[c[1] for c in CASES])
def test_invalid_utf8_names_file_and_byte_offset(tmp_path, kind, name, raw, what):
    path = tmp_path / name
    path.write_bytes(raw)
    offset = next(i for i in range(len(raw)) if _undecodable_at(raw, i))
    line = raw.count(b"\n", 0, offset) + 1
    with pytest.raises(MedmergeError) as err:
        load_dataset(f"{kind}:{path}")
    message = str(err.value)
    assert message.startswith(f"{path}: invalid UTF-8 at byte offset {offset} (line {line}): ")
    assert message.endswith(f"expected a UTF-8 {what} file") and "\n" not in message


def _undecodable_at(raw: bytes, offset: int) -> bool:
    """Whether UTF-8 decoding of `raw` fails first at `offset`."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start == offset
    return False


def test_valid_utf8_with_bom_still_loads(tmp_path):
    path = tmp_path / "g.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GENMEDGPT).encode())
    assert [p.answer for p in load_dataset(f"genmedgpt:{path}").pairs] == ["Rest."]


def _medquad_docs() -> dict[str, bytes]:
    """Two good documents, one with an invalid byte, one Latin-1 document that declares it."""
    good = MEDQUAD_DOC.format(doc="0000001", focus="Gout").encode()
    bad = MEDQUAD_DOC.format(doc="0000002", focus="Asthma").encode().replace(b"Asthma is", b"Asthma\xff is")
    latin = MEDQUAD_DOC.format(doc="0000003", focus="Caf\u00e9").replace(
        'encoding="UTF-8"', 'encoding="ISO-8859-1"'
    )
    return {"0000001.xml": good, "0000002.xml": bad, "0000003.xml": latin.encode("latin-1")}


def _check_medquad_skip(ds, offset: int) -> None:
    assert [p.focus for p in ds.pairs] == ["Gout", "Café"]
    assert ds.skipped["undecodable_document"] == 1 and "malformed_document" not in ds.skipped
    (bad,) = ds.bad_files
    assert re.search(rf"0000002\.xml: invalid UTF-8 at byte offset {offset} \(line \d+\)", bad), bad


@pytest.mark.parametrize("top", ["MedQuAD-master", "MedQuAD-577bd37b96c02d1833b2c9eed2de9f96964e96cb"])
def test_medquad_document_with_invalid_utf8_is_a_counted_skip(tmp_path, top):
    docs = _medquad_docs()
    offset = docs["0000002.xml"].index(b"\xff")
    folder = tmp_path / top / "3_GHR_QA"
    folder.mkdir(parents=True)
    archive = tmp_path / f"{top}.zip"  # a branch or a commit archive: any top folder
    with zipfile.ZipFile(archive, "w") as z:
        for name, raw in docs.items():
            (folder / name).write_bytes(raw)
            z.writestr(f"{top}/3_GHR_QA/{name}", raw)
    _check_medquad_skip(load_dataset(f"medquad:{tmp_path / top}"), offset)
    _check_medquad_skip(load_dataset(f"medquad:{archive}"), offset)


def test_medquad_all_documents_undecodable_is_one_line(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.xml").write_bytes(b"<Document>\xff</Document>")
    with pytest.raises(
        MedmergeError, match=r"no answered question/answer pairs found \(undecodable_document=1\)"
    ):
        load_dataset(f"medquad:{tmp_path}")
