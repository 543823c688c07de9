"""Greedy soup: the pure walk with a toy scorer, and the one driver (engine and CLI) on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from medmerge.config import MergeConfig
from medmerge.errors import MedmergeError
from medmerge.merge import greedy_soup, merge_models, merged_state
from medmerge.merge.tensors import folder_tensors, read_tensor


def test_greedy_soup_worked_by_hand():
    # candidates are numbers; a soup is their mean; the score is −|mean − 1|
    candidates = [3.0, 0.0, 1.4, 0.9]
    calls = []

    def score(members):
        calls.append(list(members))
        return -abs(sum(members) / len(members) - 1.0)

    result = greedy_soup(candidates, score)
    # ranking by own score: 0.9 (−0.1), 1.4 (−0.4), 0.0 (−1), 3.0 (−2)
    # 0.9 → +1.4: mean 1.15 (−0.15 < −0.1, rejected) → +0.0: 0.45 (rejected) → +3.0: 1.95 (rejected)
    assert result.members == [3]
    assert result.score == pytest.approx(-0.1)
    assert [h["kept"] for h in result.history] == [True, False, False, False]
    assert len(calls) == 4 + 3


def test_greedy_soup_adds_when_the_score_does_not_drop():
    candidates = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([5.0, 5.0])]
    target = torch.tensor([0.5, 0.5])

    def score(members):
        return -float((torch.stack(members).mean(0) - target).norm())

    result = greedy_soup(candidates, score)
    assert sorted(result.members) == [0, 1] and result.score == pytest.approx(0.0)


def test_soup_greedy_through_the_engine(tmp_path, tiny_llama, llama_experts):
    """Scorer: −‖θ_soup − θ_tiny_llama‖² of the candidate merge config. tiny_llama scores 0 and ranks first;
    averaging in any expert moves the soup away from it, so both additions are rejected and the soup is
    tiny_llama alone."""
    target = {n: read_tensor(i) for n, i in folder_tensors(tiny_llama).items()}
    scored = []

    def scorer(candidate):
        assert candidate.method == "linear" and {m.weight for m in candidate.models} == {1.0}
        weights = merged_state(candidate)
        value = -sum(float((weights[n] - target[n]).square().sum()) for n in target)
        scored.append(value)
        return value

    models = [str(tiny_llama), *map(str, llama_experts)]
    config = MergeConfig(method="soup_greedy", models=models)
    out = merge_models(config, tmp_path / "soup", scorer=scorer, progress=False)
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["soup"]["members"] == [str(tiny_llama)]
    assert [h["kept"] for h in manifest["soup"]["history"]] == [True, False, False]
    assert len(scored) == 3 + 2
    merged = {n: read_tensor(i) for n, i in folder_tensors(out).items()}
    assert all(torch.equal(merged[n], target[n]) for n in target)
    assert manifest["config"]["method"] == "soup_greedy"


def test_soup_greedy_with_the_validation_loss_scorer(tmp_path, tiny_llama, llama_experts, tiny_qa_jsonl):
    from medmerge.evaluate.scorer import merge_loss_scorer

    config = MergeConfig(
        method="soup_greedy",
        models=[str(p) for p in llama_experts],
        scorer={"specs": [f"jsonl:{tiny_qa_jsonl}"], "max_examples": 4, "batch_size": 4},
    )
    out = merge_models(config, tmp_path / "soup", scorer=merge_loss_scorer(config.scorer), progress=False)
    soup = json.loads((out / "merge.json").read_text())["soup"]
    assert len(soup["individual"]) == 2 and all(v < 0 for v in soup["individual"].values())
    best = max(soup["individual"], key=soup["individual"].get)
    assert soup["members"][0] == best


def test_soup_greedy_without_a_scorer_is_an_error(tmp_path, llama_experts):
    config = MergeConfig(method="soup_greedy", models=[str(p) for p in llama_experts])
    with pytest.raises(MedmergeError, match="soup_greedy needs a scorer"):
        merge_models(config, tmp_path / "soup", progress=False)


def test_in_memory_loss_scorer_equals_the_loss_of_the_written_soup(tmp_path, llama_experts, tiny_qa_jsonl):
    """The CLI's scorer loads a candidate's merged tensors into a resident model: its score is the loss of
    the same merge written to a folder and loaded from there (what the scorer did before)."""
    from medmerge.evaluate.scorer import merge_loss_scorer, validation_loss_scorer
    from medmerge.merge.soup import soup_config
    from medmerge.models import load_model, load_tokenizer

    config = MergeConfig(
        method="soup_greedy",
        models=[str(p) for p in llama_experts],
        scorer={"specs": [f"jsonl:{tiny_qa_jsonl}"], "max_examples": 4, "batch_size": 4},
    )
    score = merge_loss_scorer(config.scorer)
    candidate = soup_config(config, config.models)
    folder = merge_models(candidate, tmp_path / "candidate", progress=False)
    c = config.scorer
    loss = validation_loss_scorer(
        c.specs, load_tokenizer(folder), "causal", seed=c.split_seed, fractions=c.fractions, max_examples=4
    )
    assert score(candidate) == pytest.approx(-loss(load_model(folder)), abs=1e-6)
    single = soup_config(config, config.models[1:])
    assert score(single) == pytest.approx(-loss(load_model(llama_experts[1])), abs=1e-6)


def test_medmerge_merge_builds_the_scorer_from_the_config(tmp_path, llama_experts, tiny_qa_jsonl):
    import yaml

    from medmerge.cli import main

    config = {
        "method": "soup_greedy",
        "models": [str(p) for p in llama_experts],
        "scorer": {"specs": [f"jsonl:{tiny_qa_jsonl}"], "max_examples": 4, "batch_size": 4},
    }
    (tmp_path / "soup.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "soup.yaml"), "--out", str(tmp_path / "soup"), "--quiet"]) == 0
    soup = json.loads((tmp_path / "soup" / "merge.json").read_text())["soup"]
    assert len(soup["individual"]) == 2 and soup["members"][0] == max(
        soup["individual"], key=soup["individual"].get
    )
