"""Every method beside the chosen one: gap closed per domain; each family against the data-free best."""

from __future__ import annotations

import pytest

from medmerge.evaluate.by_method import family_lines, family_tests, gap_closed, markdown, method_gaps
from medmerge.evaluate.stats import paired_bootstrap

DOMAINS = ["in-domain", "out-of-domain"]


def test_gap_closed_is_the_share_of_expert_minus_multitask() -> None:
    assert gap_closed(2.0, 1.0, 1.5) == pytest.approx(0.5)
    assert gap_closed(2.0, 1.0, 0.8) == pytest.approx(1.2)  # beats the multi-task model
    assert gap_closed(2.0, 1.0, 2.5) == pytest.approx(-0.5)  # worse than the expert
    assert gap_closed(1.0, 1.2, 0.9) is None  # the multi-task model is not better: no gap
    assert gap_closed(2.0, None, 1.0) is None


def test_method_gaps_per_domain_with_families() -> None:
    losses = {
        "medquad": {"in-domain": 2.0, "out-of-domain": 3.0},
        "multitask": {"in-domain": 1.0, "out-of-domain": 2.0},
        "ties": {"in-domain": 1.75, "out-of-domain": 3.0},
        "regmean": {"in-domain": 1.5, "out-of-domain": 2.5},
    }
    gaps = {g.method: g for g in method_gaps(losses, {"ties": 1.9, "regmean": 1.8}, "medquad", DOMAINS)}
    assert gaps["ties"].family == "data_free" and gaps["regmean"].family == "data_aware"
    assert gaps["ties"].gap_closed == {"in-domain": pytest.approx(0.25), "out-of-domain": pytest.approx(0.0)}
    assert gaps["regmean"].gap_closed == {
        "in-domain": pytest.approx(0.5),
        "out-of-domain": pytest.approx(0.5),
    }
    table = markdown(list(gaps.values()), DOMAINS)
    assert table.index("| regmean | data-aware | 1.800 | 50.0% | 50.0% |") < table.index("| ties |")


def test_each_family_best_on_validation_is_tested_against_the_data_free_best() -> None:
    per_item = {
        "ties": [2.0, 2.1, 1.9, 2.2],
        "linear": [2.5, 2.5, 2.5, 2.5],
        "regmean": [1.8, 1.9, 1.7, 2.0],
        "fisher": [3.0, 3.0, 3.0, 3.0],
        "tsv": [2.0, 2.1, 1.9, 2.2],
    }
    calls = []

    def compare(a: str, b: str, domain: str):
        calls.append((a, b, domain))
        return paired_bootstrap(per_item[a], per_item[b], seed=0, resamples=200)

    validation = {"linear": 2.0, "ties": 1.5, "regmean": 1.4, "fisher": 1.6, "tsv": 1.7}
    tests = {t.family: t for t in family_tests(validation, compare, ["out-of-domain"])}
    assert set(tests) == {"data_aware", "spectral"}
    assert (tests["data_aware"].method, tests["data_aware"].versus) == ("regmean", "ties")
    assert tests["data_aware"].loss["out-of-domain"].diff == pytest.approx(-0.2)
    assert tests["spectral"].loss["out-of-domain"].diff == pytest.approx(0.0)
    assert ("regmean", "ties", "out-of-domain") in calls and ("fisher", "ties", "out-of-domain") not in calls
    lines = family_lines(list(tests.values()), lambda t: f"Δ {t.diff:+.1f}")
    assert "best data-aware merge (regmean) against the best data-free merge (ties)" in lines[0]
    assert family_tests({"regmean": 1.0}, compare, DOMAINS) == []  # nothing data-free to compare with
