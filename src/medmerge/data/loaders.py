"""One loader per real format, each reading the file exactly as its publisher ships it.

    medquad    MedQuAD: the publisher's zip archive or unpacked folder of XML documents
               (`<collection>/<doc>.xml`, one <Document> with <Focus> and <QAPairs>).
    icliniq    ChatDoctor's iCliniq JSON list of {input, answer_icliniq, answer_chatgpt, answer_chatdoctor};
               the target is the doctor's answer, `answer_icliniq`.
    genmedgpt  ChatDoctor's GenMedGPT-5k JSON list of {instruction, input, output}.
    pubmedqa   PubMedQA PQA-L JSON object {pmid: {QUESTION, LONG_ANSWER, final_decision, ...}}.
    jsonl/csv  users' own data, `question` / `answer` columns (names configurable in the SPEC), and an
               optional `group` column (`?group=COL`): the pairs sharing a value are one unit of
               group-level privacy and never straddle splits.

Every loader returns a `Dataset`: the pairs plus counts of what it skipped and why. Bad input is a
one-line `MedmergeError` naming the file and what was expected; one malformed MedQuAD document among
thousands is skipped with a warning and counted, never silently.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from xml.etree import ElementTree

from medmerge.data.records import Dataset, QAPair, normalise_whitespace
from medmerge.errors import MedmergeError

log = logging.getLogger("medmerge.data")


def utf8_error(raw: bytes) -> str | None:
    """Where and why `raw` is not UTF-8 (`byte offset N (line L): reason, byte 0xNN`), or None."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return f"byte offset {exc.start} (line {line}): {exc.reason}, byte 0x{raw[exc.start]:02x}"
    return None


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a file (a leading BOM dropped); anything else is a one-line error."""
    if path.is_dir():
        raise MedmergeError(f"{path}: is a folder, expected a {what} file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MedmergeError(f"{path}: cannot read ({exc.strerror or exc}); expected a {what} file") from exc
    error = utf8_error(raw)
    if error is not None:
        raise MedmergeError(f"{path}: invalid UTF-8 at {error}; expected a UTF-8 {what} file")
    return raw.decode("utf-8").removeprefix("\ufeff")


# ----------------------------------------------------------------------------------------- MedQuAD


def _medquad_documents(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """Yield (collection, display name, XML bytes) for every `<collection>/<doc>.xml`, in sorted order."""
    if path.is_dir():
        for file in sorted(path.rglob("*.xml")):
            yield file.parent.name, str(file), file.read_bytes()
        return
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise MedmergeError(f"{path}: not a zip archive or folder of MedQuAD XML documents ({exc})") from exc
    with archive:
        for name in sorted(n for n in archive.namelist() if n.endswith(".xml")):
            parts = PurePosixPath(name).parts
            yield parts[-2] if len(parts) > 1 else "", f"{path}!{name}", _member(path, archive, name)


_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*encoding\s*=\s*["']([A-Za-z0-9._-]+)""")


def _xml_failure(raw: bytes, exc: ElementTree.ParseError) -> tuple[str, str]:
    """(skip reason, why) for an XML document that failed to parse: invalid UTF-8 where it is declared
    (or defaulted) UTF-8, else malformed XML."""
    declared = _XML_ENCODING.match(raw)
    encoding = declared.group(1).decode().lower().replace("_", "-") if declared else "utf-8"
    error = utf8_error(raw) if encoding in ("utf-8", "utf8") else None
    if error is not None:
        return "undecodable_document", f"invalid UTF-8 at {error}"
    return "malformed_document", f"malformed XML ({exc})"


def _member(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    """The bytes of one archive member; a corrupt archive is a one-line error naming the member."""
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, OSError) as exc:
        raise MedmergeError(f"{path}!{name}: corrupt zip member ({exc}); download the archive again") from exc


def _text(element: ElementTree.Element | None) -> str:
    return normalise_whitespace("".join(element.itertext())) if element is not None else ""


# The publisher's documents come in three schemas: <Document id> (most), <DiseaseFile fid> (one CDC file)
# and a lower-case <doc docid> with <doctitle-focus>/<qaPairs>/<pair>/<question>/<answer> (four NINDS
# files). Tags are matched case-insensitively through these names.
_ROOTS = {"document": "id", "diseasefile": "fid", "doc": "docid"}
_FOCUS_TAGS = ("focus", "doctitle-focus")
_PAIR_TAGS = ("qapair", "pair")


def _child(element: ElementTree.Element, *names: str) -> ElementTree.Element | None:
    return next((c for c in element if c.tag.lower() in names), None)


def load_medquad(path: Path, *, collections: str = "") -> Dataset:
    """MedQuAD: keep answered pairs with focus, qtype and document id; count unanswered by collection.
    `collections` ("A,B"): only those source collections (folder names); an unknown name is an error."""
    pairs: list[QAPair] = []
    skipped: Counter[str] = Counter()
    bad: list[str] = []
    documents = 0
    wanted = {c.strip() for c in collections.split(",") if c.strip()}
    seen: set[str] = set()
    for collection, name, raw in _medquad_documents(path):
        seen.add(collection)
        if wanted and collection not in wanted:
            continue
        documents += 1
        try:
            root = ElementTree.fromstring(raw)
        except ElementTree.ParseError as exc:
            reason, why = _xml_failure(raw, exc)
            bad.append(f"{name}: {why}")
            skipped[reason] += 1
            log.warning("skipping %s: %s", name, why)
            continue
        qa_elements = [e for e in root.iter() if e.tag.lower() in _PAIR_TAGS]
        if root.tag.lower() not in _ROOTS:
            bad.append(f"{name}: expected a <Document> root element, found <{root.tag}>")
            skipped["malformed_document"] += 1
            log.warning("skipping %s: expected a <Document> root element, found <%s>", name, root.tag)
            continue
        if not qa_elements:
            skipped[f"document_without_pairs:{collection}"] += 1
            continue
        doc_id = root.get(_ROOTS[root.tag.lower()]) or PurePosixPath(name).stem
        focus = _text(_child(root, *_FOCUS_TAGS)) or None
        for position, qa in enumerate(qa_elements, start=1):
            question_el = _child(qa, "question")
            question, answer = _text(question_el), _text(_child(qa, "answer"))
            if not answer:
                skipped[f"unanswered:{collection}"] += 1
                continue
            if not question or question_el is None:
                skipped[f"empty_question:{collection}"] += 1
                continue
            pairs.append(
                QAPair(
                    # qids repeat inside some documents: the file name and position are unique
                    id=f"medquad/{collection}/{PurePosixPath(name).stem}/{position}",
                    question=question,
                    answer=answer,
                    source="medquad",
                    focus=focus,
                    qtype=question_el.get("qtype"),
                    doc_id=f"{collection}/{doc_id}",
                    extra={
                        "collection": collection,
                        "qid": question_el.get("qid"),
                        "url": root.get("url"),
                        "schema": root.tag,
                    },
                )
            )
    if wanted - seen:
        raise MedmergeError(
            f"{path}: no MedQuAD collection(s) {sorted(wanted - seen)} (there are: {', '.join(sorted(seen))})"
        )
    if documents == 0:
        raise MedmergeError(f"{path}: no MedQuAD XML documents found (expected <collection>/<doc>.xml)")
    return Dataset(spec="", source="medquad", pairs=pairs, skipped=skipped, bad_files=bad)


# -------------------------------------------------------------------------------------- JSON formats


def _read_json(path: Path) -> Any:
    """The parsed JSON of a UTF-8 file; empty, undecodable or invalid JSON is a one-line error."""
    text = read_text(path, "JSON")
    if not text.strip():
        raise MedmergeError(f"{path}: file is empty (expected JSON)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MedmergeError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})"
        ) from exc


def _records_from_list(
    path: Path, data: Any, fields: tuple[str, ...], what: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (index, record) of a JSON list of objects that all have `fields`; else a one-line error."""
    if not isinstance(data, list):
        raise MedmergeError(f"{path}: expected a JSON list of {what} objects, found {type(data).__name__}")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise MedmergeError(
                f"{path}: record {index} is {type(record).__name__}, expected an object {what}"
            )
        missing = [f for f in fields if f not in record]
        if missing:
            raise MedmergeError(
                f"{path}: record {index} lacks field(s) {missing}; expected {what} with fields {list(fields)}"
            )
        yield index, record


def _pairs_from_records(
    path: Path,
    source: str,
    records: Iterator[tuple[str, dict[str, Any]]],
    question_field: str,
    answer_field: str,
    extra_fields: tuple[str, ...] = (),
    group_field: str = "",
) -> Dataset:
    pairs: list[QAPair] = []
    skipped: Counter[str] = Counter()
    for record_id, record in records:
        question = normalise_whitespace(str(record.get(question_field) or ""))
        answer = normalise_whitespace(str(record.get(answer_field) or ""))
        if not answer:
            skipped["empty_answer"] += 1
            continue
        if not question:
            skipped["empty_question"] += 1
            continue
        extra = {f: record[f] for f in extra_fields if f in record}
        group = normalise_whitespace(str(record.get(group_field) or "")) if group_field else ""
        pairs.append(
            QAPair(
                id=f"{source}/{record_id}",
                question=question,
                answer=answer,
                source=source,
                group=group or None,
                extra=extra,
            )
        )
    if skipped:
        log.warning("%s: skipped %s", path, dict(skipped))
    return Dataset(spec="", source=source, pairs=pairs, skipped=skipped)


def load_icliniq(path: Path) -> Dataset:
    """iCliniq (ChatDoctor): patient question `input` → the iCliniq doctor's `answer_icliniq`."""
    fields = ("input", "answer_icliniq", "answer_chatgpt", "answer_chatdoctor")
    records = ((str(i), r) for i, r in _records_from_list(path, _read_json(path), fields, "iCliniq"))
    return _pairs_from_records(path, "icliniq", records, "input", "answer_icliniq")


def load_genmedgpt(path: Path) -> Dataset:
    """GenMedGPT-5k (ChatDoctor): patient message `input` → doctor reply `output`."""
    fields = ("instruction", "input", "output")
    records = ((str(i), r) for i, r in _records_from_list(path, _read_json(path), fields, "GenMedGPT"))
    return _pairs_from_records(path, "genmedgpt", records, "input", "output")


def load_pubmedqa(path: Path) -> Dataset:
    """PubMedQA PQA-L: QUESTION → LONG_ANSWER (the abstract's conclusion); keeps final_decision and
    CONTEXTS (the abstract without its conclusion) and the raw QUESTION, which the yes/no/maybe accuracy
    reads."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise MedmergeError(f"{path}: expected a JSON object keyed by PubMed id, found {type(data).__name__}")
    for pmid, record in data.items():
        if not isinstance(record, dict) or "QUESTION" not in record or "LONG_ANSWER" not in record:
            raise MedmergeError(
                f"{path}: entry {pmid!r} lacks QUESTION/LONG_ANSWER (expected PubMedQA PQA-L)"
            )
    return _pairs_from_records(
        path,
        "pubmedqa",
        iter(data.items()),
        "QUESTION",
        "LONG_ANSWER",
        extra_fields=("final_decision", "CONTEXTS", "QUESTION", "YEAR"),
    )


# ------------------------------------------------------------------------------------- users' tables


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV text with a header; a CSV syntax error is a one-line error."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        yield from enumerate(reader, start=2)  # line 1 is the header
    except csv.Error as exc:
        raise MedmergeError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from exc


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSON Lines text."""
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MedmergeError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise MedmergeError(f"{path}:{line_no}: expected a JSON object per line")
        yield line_no, row


def _table_rows(path: Path, kind: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a users' CSV or JSONL file, read as UTF-8."""
    text = read_text(path, kind.upper())
    return _csv_rows(path, text) if kind == "csv" else _jsonl_rows(path, text)


def _load_table(
    path: Path, kind: str, question: str = "question", answer: str = "answer", id: str = "", group: str = ""
) -> Dataset:
    """The rows' pairs; `group` names the group column (required then), else a `group` column is used
    where the file has one."""
    rows = list(_table_rows(path, kind))
    if not rows:
        raise MedmergeError(f"{path}: file is empty (expected {kind} rows with {question!r} and {answer!r})")
    for line_no, row in rows:
        missing = [c for c in (question, answer, id, group) if c and c not in row]
        if missing:
            raise MedmergeError(
                f"{path}:{line_no}: missing column(s) {missing}; columns found: {sorted(row)} "
                f"(choose others with ?question=COL&answer=COL&group=COL)"
            )
    group = group or ("group" if any("group" in row for _, row in rows) else "")
    records = ((str(row[id]) if id else str(line_no), row) for line_no, row in rows)
    return _pairs_from_records(path, path.stem, records, question, answer, group_field=group)


def load_jsonl(
    path: Path, *, question: str = "question", answer: str = "answer", id: str = "", group: str = ""
) -> Dataset:
    """JSON Lines, one object per line with question/answer fields (names configurable)."""
    return _load_table(path, "jsonl", question, answer, id, group)


def load_csv(
    path: Path, *, question: str = "question", answer: str = "answer", id: str = "", group: str = ""
) -> Dataset:
    """CSV with a header row and question/answer columns (names configurable)."""
    return _load_table(path, "csv", question, answer, id, group)
