"""PubMedQA yes/no/maybe accuracy: log-likelihoods against a brute-force forward, the official test half,
and the accuracy in `medmerge evaluate`, its report and the verdict."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from medmerge.config import EvaluateConfig
from medmerge.data import QAPair, load_dataset
from medmerge.evaluate import runner
from medmerge.evaluate.choices import (
    PUBMEDQA_CHOICES,
    accuracy_per_item,
    choice_loglikelihoods,
    has_choices,
    official_test_half,
    pubmedqa_context,
)
from medmerge.evaluate.records import Evaluation
from medmerge.evaluate.report import markdown
from medmerge.models import load_model, load_tokenizer

LABELS = ["yes", "no", "maybe", "yes", "no", "yes", "maybe", "no", "yes", "yes"]


@pytest.fixture(scope="module")
def pqal_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PubMedQA PQA-L file (the publisher's format) of 10 labelled questions."""
    data = {
        str(1000 + i): {
            "QUESTION": f"Is asthma  linked to case {i}?",
            "CONTEXTS": [f"Background {i}: asthma was studied.", "Results: the disease was common."],
            "LONG_ANSWER": f"Asthma is {label} linked.",
            "final_decision": label,
            "YEAR": "2001",
        }
        for i, label in enumerate(LABELS)
    }
    path = tmp_path_factory.mktemp("pubmedqa") / "ori_pqal.json"
    path.write_text(json.dumps(data))
    return path


def _brute_force(model, tokenizer, context: str, choice: str) -> float:
    """Σ log p(continuation) from one full forward of context ‖ continuation (lm-eval's token split)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def test_context_is_lm_eval_doc_to_text(pqal_json: Path) -> None:
    pair = load_dataset(f"pubmedqa:{pqal_json}").pairs[0]
    assert has_choices([pair])
    assert pubmedqa_context(pair) == (
        "Abstract: Background 0: asthma was studied.\nResults: the disease was common.\n"
        "Question: Is asthma  linked to case 0?\nAnswer:"  # the raw QUESTION, as lm-eval reads it
    )
    assert not has_choices([QAPair("x", "q", "a", "jsonl")])


def test_causal_loglikelihoods_match_a_full_forward(tiny_llama: Path, pqal_json: Path) -> None:
    model, tokenizer = load_model(tiny_llama), load_tokenizer(tiny_llama)
    contexts = [pubmedqa_context(p) for p in load_dataset(f"pubmedqa:{pqal_json}").pairs[:5]]
    ll = choice_loglikelihoods(model, tokenizer, "causal", contexts, batch_size=2)
    expected = [[_brute_force(model, tokenizer, c, choice) for choice in PUBMEDQA_CHOICES] for c in contexts]
    assert [v for row in ll for v in row] == pytest.approx([v for row in expected for v in row], abs=1e-4)


def test_seq2seq_loglikelihoods_are_decoder_scores(tiny_t5: Path) -> None:
    model, tokenizer = load_model(tiny_t5), load_tokenizer(tiny_t5)
    ll = choice_loglikelihoods(model, tokenizer, "seq2seq", ["Abstract: x\nQuestion: y?\nAnswer:"])
    enc = tokenizer("Abstract: x\nQuestion: y?\nAnswer:", return_tensors="pt")["input_ids"]
    for choice, value in zip(PUBMEDQA_CHOICES, ll[0], strict=True):
        labels = torch.tensor([tokenizer(choice, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=enc, labels=labels)
        assert value == pytest.approx(-float(out.loss) * labels.shape[1], abs=1e-4)


def test_accuracy_takes_the_likeliest_option_first_on_ties() -> None:
    ll = [[-1.0, -2.0, -3.0], [-2.0, -1.0, -1.5], [-1.0, -1.0, -0.5], [-1.0, -1.0, -4.0]]
    assert accuracy_per_item(ll, ["yes", "no", "yes", "yes"]) == [1.0, 1.0, 0.0, 1.0]


def test_test_half_follows_the_publisher_split(pqal_json: Path) -> None:
    pairs = load_dataset(f"pubmedqa:{pqal_json}").pairs
    half = official_test_half(pairs)
    assert half == official_test_half(pairs)  # seeded: the same every time
    counts = Counter(p.extra["final_decision"] for p in pairs if p.id in half)
    # halves per label (yes 5 → 3 + 2, no 3 → 2 + 1, maybe 2 → 1 + 1), then the script moves one pair
    # from the first half to the second so that both hold 5
    assert len(half) == 5 and counts["yes"] >= 2 and counts["no"] >= 1 and counts["maybe"] >= 1


def test_test_half_of_the_real_file_is_the_official_test_set(shared_datasets: Path) -> None:
    pairs = load_dataset(f"pubmedqa:{shared_datasets / 'pubmedqa_ori_pqal.json'}").pairs
    half = official_test_half(pairs)
    counts = Counter(p.extra["final_decision"] for p in pairs if p.id in half)
    assert counts == {"yes": 276, "no": 169, "maybe": 55}
    # PMIDs from the PubMedQA repository's data/test_ground_truth.json (first and last of each label)
    official = ["12377809", "26163474", "25699562", "24577079", "28196511", "18284441", "26134053"]
    assert all(f"pubmedqa/{pmid}" in half for pmid in official)


def test_evaluate_reports_accuracy_on_pubmedqa_sets_only(
    tiny_llama: Path, pqal_json: Path, tiny_qa_jsonl: Path, tmp_path: Path
) -> None:
    config = EvaluateConfig(
        ood=[f"pubmedqa:{pqal_json}", f"jsonl:{tiny_qa_jsonl}"],
        max_examples=10,
        generate=False,
        bootstrap_resamples=100,
        max_prompt_tokens=64,
        max_answer_tokens=16,
    )
    results = runner.evaluate([str(tiny_llama)], config, cache_dir=tmp_path / "cache", progress=False)
    name = results.model_names[0]
    cell = results.cell(name, "pubmedqa")
    assert set(cell.per_item["accuracy"]) <= {0.0, 1.0} and len(cell.per_item["accuracy"]) == 10
    acc = cell.metrics["accuracy"]
    assert acc.low <= acc.mean <= acc.high and acc.n == 10
    assert cell.metrics["accuracy_test"].n == 5 and "accuracy_test" not in cell.per_item
    assert "accuracy" not in results.cell(name, "tiny_qa").metrics
    assert "yes/no/maybe" in results.settings["accuracy"]
    data = results.to_json()
    assert Evaluation.from_json(data).to_json() == data
    report = markdown(results, results.model_names, results.datasets)
    assert "## PubMedQA accuracy (yes/no/maybe)" in report and "official 500-question test half" in report

    again = runner.evaluate([str(tiny_llama)], config, cache_dir=tmp_path / "cache", progress=False)
    assert again.cell(name, "pubmedqa").cached["choices"] is True
    assert again.cell(name, "pubmedqa").per_item["accuracy"] == cell.per_item["accuracy"]

    off = config.model_copy(update={"pubmedqa_accuracy": False})
    none = runner.evaluate([str(tiny_llama)], off, cache_dir=tmp_path / "cache", progress=False)
    assert "accuracy" not in none.cell(name, "pubmedqa").metrics
