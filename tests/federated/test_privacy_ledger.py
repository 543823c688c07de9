"""A site's privacy ledger in the federation (issue 22): every DP release a site makes — its DP expert,
each FedAvg round's DP-SGD — is charged to ONE `privacy_ledger.json` in the site's folder and composed
by the accountant; a release over `privacy.budget` is refused (code over_budget, the reason in the site's
log); the verdict shows each site's composed ε with its releases. Through the real site steps (tiny
models, the in-process LocalSend: every request and reply crosses as wire bytes)."""

from __future__ import annotations

import json

import pytest

from medmerge.federated.coordinator import Exchange
from medmerge.federated.protocol import EvaluateRequest, FedAvgRequest, TrainRequest
from medmerge.train.ledger import LEDGER_FILE, spent_epsilon
from tests.federated.common import study
from tests.federated.test_inprocess import LocalSend

pytest.importorskip("opacus")
RUN = "ab" * 16


def private_study(tmp_path, base, budget=None, **federation):
    config = study(tmp_path, base, trials=1, **federation)
    data = config.model_dump(mode="json")
    privacy = {"target_epsilon": 1.0, "max_grad_norm": 1.0, "budget": budget}
    return type(config).model_validate(
        data | {"train": data["train"] | {"privacy": privacy, "group_by_length": False}}
    )


def test_fedavg_rounds_compose_in_the_site_ledger(tmp_path, tiny_llama):
    """The expert at target ε 1 and three FedAvg rounds at target ε 1 each, through the sites' train,
    fedavg and evaluate steps: each site's ledger holds the four releases, and its ε is the accountant's
    figure for the combined history — more than any one release's ε (each ≤ 1), not the largest of them.
    The site reports it in its evaluate reply and the verdict's block recomputes and lists it."""
    from medmerge.federated.coordinator import _identity, run_fedavg
    from medmerge.federated.verdict import privacy_lines, privacy_per_site

    config = private_study(tmp_path, tiny_llama, fedavg={"rounds": 3, "local_steps": 2})
    send, out = LocalSend(config, tmp_path / "sites"), tmp_path / "coordinator"
    names = [s.name for s in config.sites]
    exchange = Exchange(send, names, 2)
    exchange.run = RUN
    assert set(exchange.ask(TrainRequest, "train")) == set(names)
    base, _, shapes = _identity(config.base_model)
    assert len(run_fedavg(config, out, exchange, base, shapes)["rounds"]) == 3
    replies = exchange.ask(EvaluateRequest, "evaluate", models={"base": "base"}, validation=False, domains=[])
    shown = privacy_per_site(config, replies)
    for site in names:
        ledger = json.loads((tmp_path / "sites" / site / LEDGER_FILE).read_text())
        releases = ledger["releases"]
        assert [r["kind"] for r in releases] == ["expert", "fedavg", "fedavg", "fedavg"]
        assert all(r["epsilon"] <= 1.0 + 1e-6 for r in releases)
        rounds = [tuple(map(tuple, r["history"])) for r in releases if r["kind"] == "fedavg"]
        three = spent_epsilon([h for r in rounds for h in r], ledger["delta"], ledger["accountant"])
        assert three > 1.2  # three rounds at ε ≤ 1 each compose to more than 1
        combined = [tuple(h) for r in releases for h in r["history"]]
        expected = spent_epsilon(combined, ledger["delta"], ledger["accountant"])
        assert ledger["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert expected > three > max(r["epsilon"] for r in releases)
        assert shown[site]["epsilon"] == pytest.approx(expected, rel=1e-6)
        assert shown[site]["delta"] == ledger["delta"] and shown[site]["matches_site"] is True
        assert [r["what"] for r in shown[site]["releases"]] == [r["what"] for r in releases]
    report = "\n".join(privacy_lines(shown))
    assert "FedAvg round 2 (fedavg)" in report and f"ε = {shown['north']['epsilon']:.3g}" in report


def test_a_release_over_the_budget_is_refused(tmp_path, tiny_llama, capfd):
    """Budget 1.2 at target ε 1 per release: the expert fits; the first FedAvg round would take the
    site past 1.2 and is refused before it trains (ErrorReply code over_budget, the reason in the
    site's log); the ledger keeps the expert alone."""
    config = private_study(tmp_path, tiny_llama, budget=1.2)
    send = LocalSend(config, tmp_path / "sites")
    trained = send(TrainRequest(run=RUN).payload(), ["north"])["north"]
    assert trained.kind == "train"
    reply = send(FedAvgRequest(run=RUN, round=0, local_steps=2).payload(), ["north"])["north"]
    assert reply.kind == "error" and reply.meta["code"] == "over_budget"
    assert "privacy.budget" in capfd.readouterr().err
    ledger = json.loads((tmp_path / "sites" / "north" / LEDGER_FILE).read_text())
    assert [r["kind"] for r in ledger["releases"]] == ["expert"]
    assert not (tmp_path / "sites" / "north" / "fedavg" / "update").exists()


def test_a_noised_sum_is_charged_to_the_same_ledger_and_refused_over_budget(tmp_path, tiny_llama):
    """secagg's secure+dp sums charge the site's one ledger through site_privacy.charge (the contract:
    PrivacyLedger.charge(Release), here a gaussian_release of σ, q); the release that would pass the
    budget is refused as OverBudget (code over_budget), and the ledger keeps what fit."""
    from medmerge.federated.site import Site
    from medmerge.federated.site_privacy import charge, summary, unit
    from medmerge.federated.wire import OverBudget
    from medmerge.train.ledger import gaussian_release

    config = private_study(tmp_path, tiny_llama, budget=1.0)
    data = config.model_dump(mode="json")
    data["train"]["privacy"]["delta"] = 1e-4
    site = Site("north", type(config).model_validate(data), tmp_path / "north")
    first = charge(site, gaussian_release(4.0, 0.5, what="statistics gram (secure sum)", unit=unit(site)))
    assert first.kind == "statistics" and 0 < first.epsilon < 1.0
    with pytest.raises(OverBudget, match="privacy.budget"):
        charge(site, gaussian_release(1.0, 1.0, what="statistics fisher (secure sum)", unit=unit(site)))
    reported = summary(site)
    assert [r["what"] for r in reported["releases"]] == ["statistics gram (secure sum)"]
    assert reported["epsilon"] == pytest.approx(spent_epsilon([(4.0, 0.5, 1)], 1e-4, "prv"))
