"""Every loader on the real files in ../shared/datasets (skipped where the folder is absent)."""

from __future__ import annotations

from collections import Counter

import pytest

from medmerge.data import load_dataset


@pytest.fixture(scope="module")
def medquad(shared_datasets):
    return load_dataset(f"medquad:{shared_datasets / 'MedQuAD-master.zip'}")


def test_medquad_answered_pairs_match_the_publisher(medquad):
    schemas = Counter(p.extra["schema"] for p in medquad.pairs)
    # The publisher's 16,407 answered pairs are those of the <Document>/<DiseaseFile> schema; four NINDS
    # documents in a lower-case <doc> schema add 16 answered pairs that other loaders silently drop.
    assert schemas["Document"] + schemas["DiseaseFile"] == 16_407
    assert schemas["doc"] == 16
    assert len(medquad) == 16_423
    assert len({p.id for p in medquad.pairs}) == len(medquad)


def test_medquad_counts_unanswered_by_collection(medquad):
    assert medquad.skipped["unanswered:10_MPlus_ADAM_QA"] == 17_348
    assert medquad.skipped["unanswered:11_MPlusDrugs_QA"] == 12_889
    assert medquad.skipped["unanswered:12_MPlusHerbsSupplements_QA"] == 792
    assert medquad.skipped["unanswered:2_GARD_QA"] == 5
    assert medquad.bad_files == []


def test_medquad_keeps_focus_qtype_doc_id_and_normalises_whitespace(medquad):
    assert all(p.qtype and p.doc_id for p in medquad.pairs)
    no_focus = [p for p in medquad.pairs if not p.focus]  # 14 CDC pairs whose <Focus> is empty
    assert len(no_focus) == 14 and {p.extra["collection"] for p in no_focus} == {"9_CDC_QA"}
    assert not any(
        "\n" in p.answer or "  " in p.answer or p.answer != p.answer.strip() for p in medquad.pairs
    )
    first = next(p for p in medquad.pairs if p.doc_id == "3_GHR_QA/0000001")
    assert first.focus == "Aarskog-Scott syndrome"
    assert first.qtype == "information"
    assert first.answer.startswith("Aarskog-Scott syndrome is a genetic disorder")
    assert "widow's peak" in first.answer  # XML entity &apos; decoded


def test_genmedgpt(shared_datasets):
    ds = load_dataset(f"genmedgpt:{shared_datasets / 'chatdoctor5k.json'}")
    assert len(ds) == 5_452
    assert ds.pairs[0].question.startswith(
        "Doctor, I have been experiencing sudden and frequent panic attacks"
    )
    assert ds.pairs[0].answer.startswith("Well, based on what you're telling me")


def test_pubmedqa_keeps_final_decision(shared_datasets):
    ds = load_dataset(f"pubmedqa:{shared_datasets / 'pubmedqa_ori_pqal.json'}")
    assert len(ds) == 1_000
    assert Counter(p.extra["final_decision"] for p in ds.pairs).keys() == {"yes", "no", "maybe"}
    first = ds.pairs[0]
    assert first.id == "pubmedqa/21645374"
    assert first.question.startswith("Do mitochondria play a role in remodelling lace plant leaves")
