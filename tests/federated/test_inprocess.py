"""The coordinator and its sites in one process (an in-process `Exchange.send`: every request and reply
still goes through the wire format's bytes, and each site answers from its own config copy, as the
resident worker does): three expert sites and an evaluate-only node holding an out-of-domain PubMedQA
set, leave-one-site-out, per-question values. Checks that each held-out site's merge is the merge of the
others' adapters only (bit for bit `merge_models`), that its numbers come from that site alone, that
the OOD set is reported with PubMedQA accuracy and paired tests, and that no text crosses the wire."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from medmerge.errors import MedmergeError
from medmerge.federated.config import FederatedConfig
from medmerge.federated.coordinator import Exchange, run_study
from medmerge.federated.wire import Payload
from medmerge.manifest import write_json_atomic
from medmerge.merge.recipe import Recipe
from tests.federated.common import study, with_evaluator, write_pubmedqa

SITES = ("north", "south", "north-2")


class LocalSend:
    """Exchange.send in one process: each site answers through `worker.answer` from its own config
    copy (one `Site` per site, kept across requests as in its worker); everything that crosses is kept
    (`wire`) and every request's recipients logged. The keys of its replies are the sites it called:
    the authenticated identities. `tamper` (tests of a dishonest site): {site: fn(request, reply) ->
    reply} rewrites that site's reply before it crosses."""

    def __init__(self, config: FederatedConfig, root: Path, tamper: dict | None = None) -> None:
        self.root, self.wire, self.log, self.tamper = root, bytearray(), [], tamper or {}
        for site in config.sites:
            write_json_atomic(
                root / site.name / "config.yaml", config.for_party(site.name).model_dump(mode="json")
            )

    def __call__(self, request: Payload, sites: list[str]) -> dict[str, Payload]:
        from medmerge.federated.worker import answer

        data = request.to_bytes()
        self.log.append((request.kind, request.meta, list(sites)))
        replies = {}
        for site in sites:
            self.wire += data
            folder = self.root / site
            reply = answer(site, str(folder / "config.yaml"), str(folder), Payload.from_bytes(data))
            if site in self.tamper:
                reply = self.tamper[site](request, reply)
            raw = reply if isinstance(reply, bytes) else reply.to_bytes()
            self.wire += raw
            replies[site] = Payload.from_bytes(raw)
        return replies


def merge_of(recipe: dict, base: Path, folders: list[str]):
    """The MergeConfig of a recipe (JSON) over folders given in the order of its experts."""
    named = dict(zip(recipe["experts"], folders, strict=True))
    return Recipe.model_validate(recipe).merge_config(str(base), named)


def test_leave_one_site_out_ood_and_paired_tests(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    from medmerge.federated.site import state_digest
    from medmerge.merge import merge_models, merged_state

    config = study(tmp_path, tiny_llama, SITES, trials=1, leave_one_out=True)
    ood = write_pubmedqa(tmp_path / "pqal.json")
    config = with_evaluator(config, ood)
    send, out = LocalSend(config, tmp_path / "sites"), tmp_path / "coordinator"
    steps: list[tuple[str, list[str]]] = []  # what `medmerge federate` shows as progress
    exchange = Exchange(
        send,
        [s.name for s in config.sites],
        2,
        evaluators=config.evaluators,
        on_step=lambda step, sites: steps.append((step, sites)),
    )
    started = time.time()
    verdict_path = run_study(config.for_party(None), out, exchange)
    names = [step for step, _ in steps]
    assert names[:2] == ["join", "train"] and "evaluate" in names
    assert ("search task_arithmetic trial 0", list(SITES)) in steps
    print(f"in-process federation with leave-one-site-out: {time.time() - started:.1f}s")
    verdict = json.loads(verdict_path.read_text())["verdict"]
    assert not verdict["dropped_sites"] and verdict["evaluators"] == ["clinic"]
    table = {row["model"]: row for row in verdict["table"]}

    # leave-one-site-out: a row per expert site, the merge of the others only, numbers from that site
    rows = {row["held_out"]: row for row in verdict["leave_one_site_out"]}
    assert set(rows) == set(SITES)
    main_merge = verdict["merges_sha256"]["task_arithmetic"]
    assert main_merge["sites_agree"] == [*SITES, "clinic"]  # every site scored the coordinator's merge
    for held, row in rows.items():
        others = [s for s in SITES if s != held]
        assert row["experts"] == others and row["method"] == "task_arithmetic"
        folders = [str(out / "experts" / s) for s in others]
        merge_models(merge_of(row["recipe"], tiny_llama, folders), tmp_path / f"loso-{held}", progress=False)
        theirs = load_file(next((tmp_path / f"loso-{held}").glob("*.safetensors")))
        ours = merged_state(merge_of(row["recipe"], tiny_llama, folders))
        assert theirs.keys() == ours.keys()
        assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) == 0.0
        # the held-out site scored exactly that merge, which is not the merge with its own adapter
        assert row["weights_sha256"] == state_digest(theirs) and row["weights_match_coordinator"]
        assert row["weights_sha256"] != main_merge["coordinator"]
        # the numbers are the held-out site's: base and experts as it reported them in the evaluation
        assert row["base_test_loss"] == table["base"]["test_loss_per_site"][held]
        assert row["best_other_expert"] in others
        assert (
            row["best_other_expert_test_loss"] == table[row["best_other_expert"]]["test_loss_per_site"][held]
        )
        assert row["own_expert_test_loss"] == table[held]["test_loss_per_site"][held]
        assert {"diff", "low", "high", "p_value"} <= set(row["merge_minus_best_other_expert"])
        search = json.loads((out / "loso" / held / "search" / "task_arithmetic.json").read_text())
        assert search["experts"] == others and search["scored_by"] == others
    for kind, meta, recipients in send.log:
        if kind == "score" and len(meta["recipe"]["experts"]) < len(SITES):  # a leave-one-out search
            assert set(recipients) == set(meta["recipe"]["experts"])  # the held-out site never scores it
        if kind == "evaluate" and meta.get("validation") is False:  # a leave-one-out evaluation
            (held,) = recipients
            assert held not in next(iter(meta["models"].values()))["experts"]
        if kind in ("train", "score"):
            assert "clinic" not in recipients  # the evaluate-only node trains and scores nothing

    # out of domain at the evaluate-only node, with PubMedQA accuracy; paired tests from per-question values
    assert verdict["out_of_domain_sets"] == ["clinic:pubmedqa"]
    for row in verdict["table"]:
        assert row["out-of-domain:loss"] > 0 and 0 <= row["out-of-domain:accuracy"] <= 1
        assert set(row["test_loss_per_site"]) == set(SITES)
    tests = verdict["statistics"]["comparisons"]
    assert {"low", "high", "p_value"} <= set(tests["out-of-domain"]["loss"])
    # accuracy per question would tell the coordinator each reference label: never sent, so no test
    assert tests["out-of-domain"]["accuracy"] is None
    assert {"low", "high", "p_value"} <= set(verdict["merge_minus_best_expert_test_loss"])
    report = (out / "report.md").read_text()
    assert "Leave-one-site-out" in report and "out-of-domain PubMedQA accuracy" in report

    # no text, question id or data path crossed the wire or reached the coordinator
    assert b"CANARY" not in send.wire and str(tmp_path / "north.jsonl").encode() not in send.wire
    assert b"pqal.json" not in send.wire
    leaked = [p for p in out.rglob("*") if p.is_file() and b"CANARY" in p.read_bytes()]
    assert not leaked
    assert b"CANARY" in ood.read_bytes()  # the canaries are real
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_min_sites_counts_expert_sites_only():
    """An evaluate-only node does not count toward min_sites, and a subset request drops only its own."""
    from medmerge.federated.protocol import HelloRequest

    def send(request: Payload, sites: list[str]) -> dict[str, Payload]:
        return {s: Payload("hello", {"site": s, "role": "expert"}) for s in sites if s != "south"}

    exchange = Exchange(
        send, ["north", "south", "west", "clinic"], 2, evaluators=["clinic"], reply_timeout_s=9
    )
    exchange.run = "0" * 32
    assert set(exchange.ask(HelloRequest, "search x trial 0", ["north", "clinic"])) == {"north", "clinic"}
    exchange.ask(HelloRequest, "search x trial 1")
    assert exchange.dropped == {"south": "search x trial 1"}
    assert exchange.drops["south"]["reason"] == "no reply within 9 s" and exchange.drops["south"]["at"]
    exchange.send = lambda request, sites: {}  # west falls silent too: one expert site is left
    with pytest.raises(MedmergeError, match="only 1 expert site"):
        exchange.ask(HelloRequest, "search x trial 2", ["west"])


def test_pooled_sums_only_with_generation(tmp_path, tiny_llama):
    """Without per-question values the sites send Σ w·v and Σ w per metric: exact pooled means (loss,
    ROUGE-L, BERTScore of answers generated at the sites), no test; no answer crosses the wire."""
    config = study(tmp_path, tiny_llama, trials=1, per_question=False)
    data = config.model_dump(mode="json")
    data["evaluate"] |= {"generate": True, "generate_examples": 2, "max_new_tokens": 4}
    config = FederatedConfig.model_validate(data)
    send = LocalSend(config, tmp_path / "sites")
    exchange = Exchange(send, [s.name for s in config.sites], 2)
    verdict = json.loads(run_study(config.for_party(None), tmp_path / "coordinator", exchange).read_text())[
        "verdict"
    ]
    assert set(verdict["merge_minus_best_expert_test_loss"]) == {"diff"}
    assert verdict["statistics"]["comparisons"] == {} and verdict["leave_one_site_out"] is None
    for row in verdict["table"]:
        assert row["in-domain:rougeL"] is not None and row["in-domain:bertscore_f1"] is not None
        assert row["out-of-domain:loss"] is None
    evaluations = [meta for kind, meta, _ in send.log if kind == "evaluate"]
    assert len(evaluations) == 1
    assert b"per_item" not in send.wire and b"CANARY" not in send.wire
    # the pooled test loss is Σ nll / Σ tokens over the sites, exactly
    pooled = json.loads((tmp_path / "coordinator" / "evaluation.json").read_text())
    cells = [pooled["results"]["base"][s["name"]] for s in pooled["datasets"]]
    nll = sum(c["per_item"]["loss"][0] * c["weights"]["loss"][0] for c in cells)
    tokens = sum(c["weights"]["loss"][0] for c in cells)
    base = next(r for r in verdict["table"] if r["model"] == "base")
    assert base["test_loss"] == pytest.approx(nll / tokens, rel=1e-12)


def test_shared_statistics_regmean(tmp_path, tiny_llama, capsys):
    """federation.share_statistics: each expert site computes its Gram matrices after training and sends
    them with its adapter; the coordinator checks them and forwards them to every other party, one
    message per site. The coordinator's RegMean merge is bit for bit `merge_models` over the sites' own
    experts and statistics (as `medmerge merge` would build it at a site), every party scored exactly
    those weights, the statistics' bytes are counted in one_shot, and no text or data path crossed the
    wire. RegMean++ (which reads the training data) is left out, in one printed line."""
    from safetensors.torch import load_file

    from medmerge.federated.site import STATISTICS_FILES
    from medmerge.merge import merge_models
    from medmerge.site_stats import SiteStatistics

    sites = ("north", "south")
    statistics = {"examples": 6, "fisher_examples": 2, "batch_size": 4}
    config = study(tmp_path, tiny_llama, sites, trials=2, share_statistics=True, statistics=statistics)
    config = with_evaluator(config, write_pubmedqa(tmp_path / "pqal.json"))
    config = config.model_copy(update={"methods": ["regmean", "regmean_plus_plus"]})
    send, out = LocalSend(config, tmp_path / "sites"), tmp_path / "coordinator"
    exchange = Exchange(send, [s.name for s in config.sites], 2, evaluators=config.evaluators)
    verdict = json.loads(run_study(config.for_party(None), out, exchange).read_text())["verdict"]
    printed = capsys.readouterr().out
    assert "regmean_plus_plus left out: it reads the experts' training data" in printed
    assert len([line for line in printed.splitlines() if "left out" in line]) == 1
    methods = json.loads((out / "methods.json").read_text())
    assert methods["searched"] == ["regmean"] and methods["statistics"] == ["gram"]
    assert list(methods["left_out"]) == ["regmean_plus_plus"]

    # the coordinator's merge = merge_models over each site's own expert folder (adapter + statistics)
    best = json.loads((out / "search" / "regmean.json").read_text())["best"]["recipe"]
    own = [str(tmp_path / "sites" / s / "expert") for s in sites]
    merge_models(merge_of(best, tiny_llama, own), tmp_path / "at-site", progress=False)
    theirs = load_file(next((tmp_path / "at-site").glob("*.safetensors")))
    ours = load_file(next((out / "merges" / "regmean").glob("*.safetensors")))
    assert theirs.keys() == ours.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) == 0.0
    assert verdict["merges_sha256"]["regmean"]["sites_agree"] == [*sites, "clinic"]

    # what was shared: the Grams asked for, the record without its data sources; counted in one_shot
    counts = verdict["bytes_by_approach"]["one_shot"]
    shared = {}
    for site in sites:
        with SiteStatistics.open(out / "experts" / site) as stats:
            assert stats.has("gram") and not stats.has("fisher") and stats.names("gram")
            assert set(stats.info) <= {"format", "kinds", "dtype", "bytes", "sha256", "aliases"} | {
                "examples",
                "tokens",
                "per_kind",
            }
            assert stats.info["examples"] == 6
        shared[site] = sum((out / "experts" / site / f).stat().st_size for f in STATISTICS_FILES)
        peer = tmp_path / "sites" / sites[1 - sites.index(site)] / "peers" / site
        for f in STATISTICS_FILES:  # the other site and the evaluate-only node hold the same bytes
            for holder in (peer, tmp_path / "sites" / "clinic" / "peers" / site):
                assert (holder / f).read_bytes() == (out / "experts" / site / f).read_bytes()
    assert verdict["shared_statistics_bytes"] == shared
    for site, other in (sites, sites[::-1]):  # each sent its own, received the other's
        assert counts["received_from_site"][site] > shared[site]
        assert counts["sent_to_site"][site] > shared[other]
    assert counts["sent_to_site"]["clinic"] > sum(shared.values())
    for kind, meta, recipients in send.log:
        if kind == "statistics":  # one message per site, to every party but its owner
            assert set(recipients) == {"clinic", *sites} - {meta["peer"]}
    assert [meta["peer"] for kind, meta, _ in send.log if kind == "statistics"] == list(sites)
    assert b"CANARY" not in send.wire and str(tmp_path / "north.jsonl").encode() not in send.wire
    assert str(tmp_path / "sites").encode() not in send.wire
    assert not [p for p in out.rglob("*") if p.is_file() and b"CANARY" in p.read_bytes()]


def test_statistics_left_out_unless_shared(tmp_path, tiny_llama):
    """Without federation.share_statistics the methods that need statistics are left out, saying how to
    turn sharing on; RegMean++ always; and a site whose own config does not share refuses to."""
    from medmerge.federated.coordinator import _methods
    from medmerge.federated.site import Site

    config = study(tmp_path, tiny_llama, trials=1)
    config = config.model_copy(
        update={"methods": ["task_arithmetic", "regmean", "fisher", "regmean_plus_plus"]}
    )
    methods, left_out = _methods(config)
    assert methods == ["task_arithmetic"] and list(left_out) == ["regmean", "fisher", "regmean_plus_plus"]
    assert "gram statistics" in left_out["regmean"] and "fisher statistics" in left_out["fisher"]
    assert all("federation.share_statistics: true" in left_out[m] for m in ("regmean", "fisher"))
    assert "training data" in left_out["regmean_plus_plus"]
    shared = config.model_copy(
        update={"federation": config.federation.model_copy(update={"share_statistics": True})}
    )
    assert _methods(shared) == (
        ["task_arithmetic", "regmean", "fisher"],
        {"regmean_plus_plus": left_out["regmean_plus_plus"]},
    )
    site = Site("north", config.for_party("north"), tmp_path / "north")
    with pytest.raises(
        MedmergeError, match="site north: asked for site statistics .*share_statistics: false"
    ):
        site.train(["gram"])
