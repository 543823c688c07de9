"""Secure statistics wired into the federation (`federation.statistics.mode: secure`), with real messages:
the coordinator and four tiny expert sites in one process, every request and reply through the wire
format's bytes (LocalSend), each site answering from its own config copy and folder.

- the coordinator's RegMean merge equals plain RegMean (today's regmean_solve over the sites' own
  statistics) within the quantization tolerance;
- no single site's Gram, nor its contribution, crossed the wire or sits in the coordinator's folder,
  no `statistics` message was sent, and what the coordinator holds (the sums and every adapter) does
  not determine a site's Gram (the rank of the map from the sites' Grams to what it holds);
- a site that falls silent mid-round (after sharing its keys) leaves the exact sum of the rest;
- a 2-site secure sum is refused (by the coordinator, and by a site that is asked anyway).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medmerge.errors import MedmergeError
from medmerge.federated.coordinator import Exchange, run_study
from medmerge.federated.wire import Payload
from tests.federated.common import study
from tests.federated.test_inprocess import LocalSend

SITES = ("north", "south", "north-2", "south-2")
SILENT = "south-2"
OTHER_TOPICS = {
    "north-2": ["gout", "anemia"],
    "south-2": ["migraine", "asthma", "sciatica"],
}  # falls silent at the first masked-vector stage


class SilentSend(LocalSend):
    """LocalSend in which `silent` gives no reply to its first secagg_masked_vector request."""

    def __init__(self, *args, silent: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.silent, self.silenced = silent, False

    def __call__(self, request: Payload, sites: list[str]) -> dict[str, Payload]:
        if request.kind == "secagg_masked_vector" and self.silent in sites and not self.silenced:
            self.silenced = True
            sites = [s for s in sites if s != self.silent]
        return super().__call__(request, sites)


@pytest.fixture(scope="module")
def secure_study(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("secure")
    config = study(root, tiny_llama, SITES, trials=2, statistics={"mode": "secure", "examples": 8})
    for site, topics in OTHER_TOPICS.items():  # four sites, four different datasets
        rows = [
            {"question": f"What is {t}? CANARY{site}{i}", "answer": f"{t} is treated with care {i}."}
            for i in range(30)
            for t in [topics[i % len(topics)]]
        ]
        (root / f"{site}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = config.model_copy(update={"methods": ["task_arithmetic", "regmean"]})
    send = SilentSend(config, root / "sites", silent=SILENT)
    exchange = Exchange(send, list(SITES), 3)
    verdict = run_study(config.for_party(None), root / "coordinator", exchange)
    return config, send, exchange, root, json.loads(verdict.read_text())["verdict"]


def _site_statistics(root: Path, site: str):
    from medmerge.site_stats import SiteStatistics

    return SiteStatistics.open(root / "sites" / site / "secure" / "statistics")


def test_secure_regmean_equals_plain_regmean_and_a_silent_site_leaves_the_rest(secure_study, tiny_llama):
    from safetensors.torch import load_file

    from medmerge.federated.secure_site import _range_row, contribution
    from medmerge.federated.worker import site_of
    from medmerge.merge import merged_state
    from medmerge.merge.recipe import Recipe

    config, send, exchange, root, verdict = secure_study
    out = root / "coordinator"
    record = json.loads((out / "secure" / "regmean.json").read_text())
    ranges, sums = record["rounds"]
    rest = [s for s in SITES if s != SILENT]
    # the silent site shared its keys, then sent nothing: the range round is the exact sum of the rest
    assert ranges["purpose"] == "range" and ranges["participants"] == sorted(SITES)
    assert ranges["survivors"] == sorted(rest) and ranges["dropped"] == [SILENT]
    assert sums["participants"] == sorted(rest) and sums["survivors"] == sorted(rest)
    assert not exchange.dropped  # out of one round, not out of the study
    assert "sums over 3 sites" in verdict["statistics_seen"], verdict["statistics_seen"]
    assert "no single site's statistics" in verdict["statistics_seen"]

    # the range round's total, recomputed from each surviving site's own rows
    sites = {s: site_of(s, str(root / "sites" / s / "config.yaml"), str(root / "sites" / s)) for s in SITES}
    chosen = json.loads((out / "search" / "regmean.json").read_text())["best"]["recipe"]
    assert chosen["experts"] == sorted(rest) and chosen["weights"] == [1.0, 1.0, 1.0]
    merged = load_file(str(out / "secure" / "regmean" / "merged.safetensors"))
    names = [f"{kind}.{w}" for w in merged for kind in ("wg", "wd")]
    own = {s: contribution(sites[s], "secure", names) for s in rest}
    for name in names:
        expected = sum(_range_row(own[s][name], 1.0) for s in rest)
        assert expected.max() == 3  # every surviving site lies under the chosen clip

    # (a) the merge from secure sums equals plain RegMean over the same three experts' own statistics
    folders = {}
    for s in rest:
        folder = root / "plain" / s
        shutil.copytree(out / "experts" / s, folder)
        for file in ("statistics.safetensors", "statistics.json"):
            shutil.copy(root / "sites" / s / "secure" / "statistics" / file, folder / file)
        folders[s] = str(folder)
    plain = merged_state(Recipe.model_validate(chosen).merge_config(str(tiny_llama), folders))
    assert merged and set(merged) <= set(plain)
    for name, tensor in merged.items():
        scale = float(plain[name].abs().max())
        error = float((tensor - plain[name]).abs().max())
        assert error <= 1e-5 * scale, (name, error, scale)  # quantization 2^-43 of the clip, float32 solve
    # every site scored exactly that merge (the digest the coordinator computed from the sums)
    assert verdict["merges_sha256"]["regmean"]["sites_agree"] == list(SITES)
    assert "regmean" in {row["model"] for row in verdict["table"]}


def test_no_single_sites_gram_reaches_the_coordinator(secure_study):
    config, send, exchange, root, verdict = secure_study
    out = root / "coordinator"
    kinds = {kind for kind, _, _ in send.log}
    assert "statistics" not in kinds and {"secagg_setup", "secagg_unmask", "secure_merge"} <= kinds
    train = next(meta for kind, meta, _ in send.log if kind == "train")
    assert train["statistics"] == []  # no site is asked for its plain statistics
    wire = bytes(send.wire)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith("statistics")]
    stored = b"".join(p.read_bytes() for p in files)
    for site in SITES:
        with _site_statistics(root, site) as stats:
            for name in stats.names("gram"):
                gram = stats.read("gram", name).double()
                rows = [gram[0, :4], gram[1, :4], gram.diagonal()[:4]]
                for row in rows:  # float32 and float64 bytes of any 4 consecutive entries
                    for pattern in (row.float().numpy().tobytes(), row.numpy().tobytes()):
                        assert pattern not in wire and pattern not in stored, (site, name)


def test_the_sums_with_the_public_adapters_still_determine_a_tiny_sites_gram(secure_study):
    """The limit of secure sums for RegMean, measured (docs/secure-aggregation.md): the coordinator holds
    S_G = Σ G_i, S_WG = Σ ΔW_i G_i, S_WD = Σ ΔW_i diag(G_i) AND every site's ΔW_i (the adapters every
    party exchanges). These are linear in the sites' Grams; for this tiny model (hidden 32; q, k, v read
    one input: 32 + 16 + 16 rows of equations per column, plus S_G's, for 3 × 32 unknowns) the map from
    the three Grams to what the coordinator holds is injective on site 1's Gram: in exact arithmetic all
    of it follows. (The real model's layer 0 gives 576 + 960 rows for 3 × 576 unknowns, and quantization
    noise hides what the float32 rounding of ΔW adds to LoRA's rank r; bench/gram_inversion.py's
    `secure+adapters` case measures what an attacker recovers there.) Only secure+dp's noise, or a
    coordinator without the adapters, closes this."""
    from medmerge.federated.secure_site import expert_deltas

    config, send, exchange, root, verdict = secure_study
    out = root / "coordinator"

    rest = [s for s in SITES if s != SILENT]
    stored_name = "model.layers.0.self_attn.q_proj.weight"
    with _site_statistics(root, rest[0]) as stats:
        readers = [w for w, s in stats.info["aliases"].items() if s == stored_name] + [stored_name]
        n = stats.read("gram", stored_name).shape[0]
    deltas = {s: expert_deltas(config.base_model, out / "experts" / s) for s in rest}
    rows, cols = torch.triu_indices(n, n)
    basis = []
    for k in range(len(rows)):
        e = torch.zeros(n, n, dtype=torch.float64)
        e[rows[k], cols[k]] = e[cols[k], rows[k]] = 1.0
        basis.append(e)

    def observe(site: str, g: torch.Tensor) -> torch.Tensor:
        parts = [g[rows, cols]]
        for w in readers:
            d = deltas[site][w]
            parts += [(d @ g).flatten(), (d * g.diagonal()).flatten()]
        return torch.cat(parts)

    m = torch.stack([observe(s, e) for s in rest for e in basis], dim=1)  # observations × unknowns
    k = len(basis)
    first = torch.zeros(k, m.shape[1], dtype=torch.float64)
    first[:, :k] = torch.eye(k)
    rank = int(torch.linalg.matrix_rank(m))
    determined = rank + k - int(torch.linalg.matrix_rank(torch.cat([m, first])))
    print(f"site {rest[0]}'s layer-0 Gram: {determined} of {k} dimensions follow from the coordinator's view")
    assert determined == k
    without_products = torch.linalg.matrix_rank(torch.cat([m[: len(rows)], first]))  # S_G alone
    assert int(without_products) == int(torch.linalg.matrix_rank(m[: len(rows)])) + k  # nothing follows


def test_a_two_site_secure_sum_is_refused(secure_study):
    from medmerge.federated.protocol import SecAggSetupRequest, decode, reply_type
    from medmerge.federated.secagg import TensorSpec
    from medmerge.federated.secure_stats import secure_sum

    config, send, exchange, root, verdict = secure_study
    layout = [TensorSpec(name="range.gram.x", shape=(100,), clip=1.0)]
    spec = {"purpose": "range", "weights": {"north": 1.0, "south": 1.0}}
    with pytest.raises(MedmergeError, match="participants"):  # the coordinator does not set it up
        secure_sum(exchange, "two sites", "two-sites", ["north", "south"], layout, spec)
    setup = {  # a coordinator that asks anyway: the site refuses
        "round_id": "two-sites",
        "participants": ["north", "south"],
        "threshold": 2,
        "neighbours": 1,
        "levels": 2**44,
        "modulus_bits": 64,
        "layout": [{"name": "range.gram.x", "shape": [100], "clip": 1.0}],
    }
    setup["neighbours"] = 2  # the smallest the wire accepts; the record still refuses two participants
    request = SecAggSetupRequest(run=exchange.run, setup=setup, **spec)
    reply = send(request.payload(), ["north"])["north"]
    message = decode(reply, reply_type("secagg_setup"), sender="north")
    assert message.KIND == "error" and message.code == "refused"
    history = json.loads((root / "sites" / "north" / "secagg_history.json").read_text())
    assert "two-sites" not in json.dumps(history)


def test_a_secure_sum_left_with_two_sites_fails(secure_study):
    from medmerge.federated.secagg import RoundFailed, TensorSpec
    from medmerge.federated.secure_stats import secure_sum

    config, send, exchange, root, verdict = secure_study
    three = ["north", "north-2", "south"]
    send.silent, send.silenced = "north-2", False
    layout = [TensorSpec(name="range.gram.model.layers.0.self_attn.q_proj.weight", shape=(100,), clip=1.0)]
    spec = {"purpose": "range", "weights": dict.fromkeys(three, 1.0)}
    with pytest.raises(RoundFailed, match="2 sites left"):
        secure_sum(exchange, "left with two", "left-with-two", three, layout, spec)


def test_secure_dp_searches_weights_one_charged_round_per_trial(tmp_path, tiny_llama):
    """secure+dp: clipped statistics, each trial's weights their own noised round, each round charged
    to every site's privacy ledger before its vector left; fisher is left out (no DP Fisher)."""
    sites = ("north", "south", "north-2")
    statistics = {"mode": "secure+dp", "examples": 8, "clip": 50.0, "sigma": 1.0}
    config = study(tmp_path, tiny_llama, sites, trials=2, statistics=statistics)
    rows = [{"question": f"Is gout {i} painful?", "answer": f"Gout hurts {i}."} for i in range(30)]
    (tmp_path / "north-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = config.model_copy(update={"methods": ["regmean", "fisher"]})
    send, out = LocalSend(config, tmp_path / "sites"), tmp_path / "coordinator"
    verdict = json.loads(run_study(config.for_party(None), out, Exchange(send, list(sites), 3)).read_text())
    verdict = verdict["verdict"]
    assert "fisher" in json.loads((out / "methods.json").read_text())["left_out"]
    assert "noise (σ = 1)" in verdict["statistics_seen"] and "sums over 3 sites" in verdict["statistics_seen"]
    search = json.loads((out / "search" / "regmean.json").read_text())
    assert len(search["trials"]) == 2 and search["trials"][1]["recipe"]["weights"] != [1.0, 1.0, 1.0]
    rounds = json.loads((out / "secure" / "regmean.json").read_text())["rounds"]
    assert [r["purpose"] for r in rounds] == ["sum", "sum"]  # no range round: the clip is public
    for site in sites:
        ledger = json.loads((tmp_path / "sites" / site / "privacy_ledger.json").read_text())
        assert [r["history"] for r in ledger["releases"]] == [[[1.0, 1.0, 1]]] * 2
        assert ledger["epsilon"] > 0
        info = json.loads(
            (tmp_path / "sites" / site / "secure" / "statistics" / "statistics.json").read_text()
        )
        assert info["privacy"]["clip"] == 50.0
