"""One privacy ledger per site: releases compose through Opacus's accountant, the budget is enforced
before the work, and the file is the site's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmerge.errors import MedmergeError
from medmerge.train import train_expert
from medmerge.train.ledger import LEDGER_FILE, PrivacyLedger, Release, gaussian_release, spent_epsilon
from medmerge.train.privacy import read_privacy
from tests.train.helpers import tiny_config


def _round_config(model: Path, data: Path, round_: int):
    """One FedAvg round's local DP training at target ε = 1 (what a site's fedavg step runs)."""
    return tiny_config(
        model,
        data,
        privacy={"target_epsilon": 1.0, "delta": 1e-3, "accountant": "prv"},
        max_steps=4,
        eval_every=0,
        seed=round_,
        autocast="off",
    )


def test_three_rounds_at_target_one_compose_to_the_accountants_figure(tiny_llama, tiny_qa_jsonl, tmp_path):
    """Three DP trainings charged to one site's ledger, each at target ε = 1: the site's ε is Opacus's
    for the three histories together (well above 1), not 1."""
    site = tmp_path / "site"
    for r in (1, 2, 3):
        train_expert(_round_config(tiny_llama, tiny_qa_jsonl, r), tmp_path / f"round{r}", progress=False,
                     ledger=site, release=f"FedAvg round {r}")  # fmt: skip
    ledger = PrivacyLedger.load(site)
    assert [r.what for r in ledger.releases] == ["FedAvg round 1", "FedAvg round 2", "FedAvg round 3"]
    histories = [read_privacy(tmp_path / f"round{r}").history for r in (1, 2, 3)]
    assert [r.history for r in ledger.releases] == histories
    assert all(r.epsilon <= 1.0 for r in ledger.releases)
    from opacus.accountants import PRVAccountant

    reference = PRVAccountant()
    for history in histories:
        for sigma, q, steps in history:
            for _ in range(steps):
                reference.step(noise_multiplier=sigma, sample_rate=q)
    composed = ledger.epsilon(1e-3)
    assert composed == pytest.approx(reference.get_epsilon(delta=1e-3), rel=1e-6)
    assert 1.4 < composed < 3.0  # composed: more than one round's 1, less than the naive sum 3
    saved = json.loads((site / LEDGER_FILE).read_text())
    assert saved["epsilon"] == pytest.approx(composed) and saved["unit"] == "pair" and saved["delta"] == 1e-3


def test_the_budget_refuses_a_release_before_it_runs(tiny_llama, tiny_qa_jsonl, tmp_path):
    site = tmp_path / "site"
    config = _round_config(tiny_llama, tiny_qa_jsonl, 1)
    capped = config.model_copy(update={"privacy": config.privacy.model_copy(update={"budget": 1.2})})
    train_expert(capped, tmp_path / "r1", progress=False, ledger=site, release="round 1")
    before = (site / LEDGER_FILE).read_text()
    steps: list[int] = []
    with pytest.raises(MedmergeError, match=r"privacy.budget: round 2 would take the site's ε from") as info:
        train_expert(capped, tmp_path / "r2", progress=False, ledger=site, release="round 2",
                     hooks=[lambda t, s: steps.append(s)])  # fmt: skip
    assert "\n" not in str(info.value) and "over its budget 1.2" in str(info.value)
    assert steps == [] and not (tmp_path / "r2").exists()  # refused before the first step
    assert (site / LEDGER_FILE).read_text() == before
    alone = capped.model_copy(update={"privacy": capped.privacy.model_copy(update={"budget": 0.5})})
    with pytest.raises(MedmergeError, match="privacy.budget: expert would take"):  # no ledger: this run
        train_expert(alone, tmp_path / "r3", progress=False)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_statistics_release_composes_with_dp_sgd(tmp_path, accountant):
    """A Gaussian release of noised statistics (q = 1, once) charged after a DP-SGD release: the site's
    ε is the accountant's for both histories; the release alone is the Gaussian mechanism's ε."""
    ledger = PrivacyLedger.load(tmp_path, delta=1e-5, accountant=accountant)
    sgd = Release("expert", "DP-SGD", "group", ((1.1, 0.01, 300),), "one MedQuAD focus topic")
    ledger.charge(sgd)
    stats = ledger.charge(gaussian_release(5.0, what="statistics gram", unit="group"))
    assert stats.history == ((5.0, 1.0, 1),) and stats.mechanism == "Gaussian mechanism"
    assert stats.epsilon == spent_epsilon([(5.0, 1.0, 1)], 1e-5, accountant) > 0
    both = spent_epsilon([(1.1, 0.01, 300), (5.0, 1.0, 1)], 1e-5, accountant)
    assert ledger.epsilon() == both > max(ledger.releases[0].epsilon, stats.epsilon)
    again = PrivacyLedger.load(tmp_path)
    assert again.epsilon() == both and again.releases == ledger.releases
    assert "composed: ε" in again.lines()[-1] and len(again.lines()) == 3


def test_releases_that_cannot_compose_are_refused(tmp_path):
    ledger = PrivacyLedger.load(tmp_path, delta=1e-5)
    ledger.charge(gaussian_release(2.0, unit="group"))
    with pytest.raises(MedmergeError, match="protect one group; statistics protects one pair"):
        ledger.charge(gaussian_release(2.0, unit="pair"))
    with pytest.raises(MedmergeError, match="the site's δ is 1e-05, not 1e-06"):
        PrivacyLedger.load(tmp_path, delta=1e-6)
    with pytest.raises(MedmergeError, match="a DP release needs σ > 0"):
        gaussian_release(0.0)
    with pytest.raises(MedmergeError, match="expected 0 < q ≤ 1"):
        gaussian_release(1.0, sample_rate=1.5)
    (tmp_path / LEDGER_FILE).write_text("{}")
    with pytest.raises(MedmergeError, match="not a privacy ledger"):
        PrivacyLedger.load(tmp_path)
