"""Secure aggregation (SecAgg+): real keys, real Shamir shares, real Fernet tokens, in-process transport.

Every round here crosses `LocalExchange`, which serialises each record to JSON and parses it back at the
receiver, and keeps every byte the coordinator relayed (`wire`)."""

from __future__ import annotations

import base64
import itertools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from medmerge.errors import MedmergeError
from medmerge.federated.secagg import (
    HISTORY_FILE,
    Contribution,
    LocalExchange,
    RoundFailed,
    SecAggCoordinator,
    SecAggRefused,
    SecAggSite,
    SetupRequest,
    SitePolicy,
    recommended_setup,
    run_secure_sum,
    simulate_sum,
    spec_for,
)
from medmerge.federated.secagg_records import MaskedVectorRequest, UnmaskReply, UnmaskRequest
from medmerge.federated.secagg_vector import mask, ordered

CLIP = 4.0


def site_data(names, seed=0):
    """Each site's tensors: a Gram-like (symmetric PSD, scaled) block and a vector."""
    rng = np.random.default_rng(seed)
    data = {}
    for name in names:
        a = rng.normal(size=(24, 12)).astype(np.float32)
        data[name] = {
            "gram": (a @ a.T / 12).astype(np.float32),
            "fisher": rng.uniform(-1, 1, 9).astype(np.float32),
        }
    return data


def layout(data):
    first = next(iter(data.values()))
    return [spec_for(name, t, CLIP) for name, t in first.items()]


def make_sites(root: Path, data, charge=None, policy=None, noise=None):
    return {
        n: SecAggSite(
            n,
            root / n,
            lambda setup, n=n: Contribution(data[n], noise_multiplier=noise),
            charge=charge,
            policy=policy,
        )
        for n in data
    }


def run(setup, sites, **exchange):
    ex = LocalExchange(sites, **exchange)
    return run_secure_sum(SecAggCoordinator(setup), ex), ex


def exact(data, names, weights=None):
    return {
        k: sum((weights or {}).get(n, 1.0) * data[n][k].astype(np.float64) for n in names)
        for k in data[names[0]]
    }


@pytest.mark.parametrize(("n", "bits"), [(3, 32), (5, 64)])
def test_sum_within_quantization_tolerance(tmp_path, n, bits):
    names = [f"site{i}" for i in range(n)]
    data = site_data(names)
    setup = recommended_setup("r1", names, layout(data), modulus_bits=bits, levels=2**20)
    result, ex = run(setup, make_sites(tmp_path, data), stream=n == 5)  # 5: vectors added as they come
    assert result.survivors == tuple(names) and not ex.refusals
    truth = exact(data, names)
    for name, value in result.tensors.items():
        step = 2 * CLIP / 2**20  # Δ = 2c/L; each site rounds by at most Δ/2
        err = np.abs(value - truth[name]).max()
        assert err <= n * step / 2 * (1 + 1e-9)
        assert err > n * step / 2 / 8  # the rounding is real: the bound is not loose by orders of magnitude
    # the stats side's simulation is the protocol's arithmetic, bit for bit
    simulated = simulate_sum(setup, data)
    for name, value in result.tensors.items():
        assert np.array_equal(simulated[name], value)


def test_weighted_sum(tmp_path):
    names = ["a", "b", "c", "d"]
    data, weights = site_data(names, seed=1), {"a": 0.5, "b": 0.25, "c": 0.125, "d": 0.125}
    setup = recommended_setup("w", names, layout(data), weights=weights)
    result, _ = run(setup, make_sites(tmp_path, data))
    truth = exact(data, names, weights)
    for name, value in result.tensors.items():
        assert np.abs(value - truth[name]).max() <= result.tolerance[name]


def masked_vectors(ex, setup):
    out = {}
    for direction, site, stage, data in ex.wire:
        if direction == "from" and stage == "secagg_masked_vector":
            raw = base64.urlsafe_b64decode(json.loads(data)["vector"])
            out[site] = np.frombuffer(raw, dtype="<u4" if setup.itemsize == 4 else "<u8").astype(np.uint64)
    return out


def looks_uniform(y: np.ndarray, bits: int) -> bool:
    """Chi-square of the top 4 bits over 16 cells (15 degrees of freedom; 37.7 is its 0.1% quantile)."""
    counts = np.bincount((y >> np.uint64(bits - 4)).astype(np.int64), minlength=16)
    expected = y.size / 16
    return float(((counts - expected) ** 2 / expected).sum()) < 37.7


def test_coordinator_view_holds_no_single_site(tmp_path):
    names = ["a", "b", "c", "d"]
    data = site_data(names, seed=2)
    setup = recommended_setup("view", names, layout(data), modulus_bits=32)
    result, ex = run(setup, make_sites(tmp_path, data))
    modulus = np.uint64(2**32)
    quantized = {}  # each site's Q(x) mod M, as its vector would carry it without masks
    for n in names:
        raw, _ = mask(setup, ordered(setup, data[n]), 1.0, None, [])
        quantized[n] = np.frombuffer(raw, dtype="<u4").astype(np.uint64)
    ys = masked_vectors(ex, setup)
    assert set(ys) == set(names)
    # control: an unmasked Q(x) fails the uniformity test, so the test can tell
    assert not any(looks_uniform(q, 32) for q in quantized.values())
    for y in ys.values():
        assert looks_uniform(y, 32)
    # no subset-sum of the masked vectors equals (or nearly equals) any site's Q(x), entry by entry
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            total = sum(ys[s] for s in subset) % modulus
            for q in quantized.values():
                near = np.abs(((total - q + np.uint64(2**31)) % modulus).astype(np.int64) - 2**31) < 2**20
                assert near.mean() < 0.01
    # nor does any raw float of a site's tensors appear anywhere on the wire
    wire = b"".join(d for *_, d in ex.wire)
    for n in names:
        for t in data[n].values():
            assert t.tobytes()[:16] not in wire and base64.b64encode(t.tobytes()[:12]) not in wire
    # what the coordinator does learn is the sum, and only after the unmask stage
    truth = exact(data, names)
    assert all(np.abs(result.tensors[k] - truth[k]).max() <= result.tolerance[k] for k in truth)


def test_two_site_sum_refused_by_sites(tmp_path):
    data = site_data(["a", "b"])
    sites = make_sites(tmp_path, data)
    full = recommended_setup("three", ["a", "b", "z"], layout(data))
    two = SetupRequest.model_construct(**{**dict(full), "participants": ("a", "b"), "neighbours": 1})
    ex = LocalExchange(sites)  # as JSON: each site's own parser refuses
    assert ex({"a": two, "b": two}) == {} and set(ex.refusals) == {"a", "b"}
    for n in ("a", "b"):  # handed the object directly, the site re-checks it
        fresh = SecAggSite(n, tmp_path / f"{n}2", lambda s: Contribution({}))
        with pytest.raises(SecAggRefused, match="participants|fewer than 3"):
            fresh.handle(two)
        assert fresh.stage == "refused"


def test_two_survivors_refused_at_unmask(tmp_path):
    """A coordinator that unmasks with 2 survivors out of 3 gets no share from them."""
    names = ["a", "b", "c"]
    data = site_data(names)
    sites = make_sites(tmp_path, data)
    coord, ex = SecAggCoordinator(recommended_setup("r", names, layout(data))), LocalExchange(sites)
    replies = ex(coord.share_keys_requests(ex(coord.setup_requests())))
    ex(coord.masked_vector_requests(replies))
    dishonest = UnmaskRequest.model_construct(survivors=("a", "b"), dropped=("c",))
    for n in ("a", "b"):
        with pytest.raises(SecAggRefused, match="survivors|2 sites"):
            sites[n].handle(dishonest)
    assert not any(d == "from" and s == "secagg_unmask" for d, _, s, _ in ex.wire)


@pytest.mark.parametrize("stage", ["secagg_masked_vector", "secagg_unmask"])
def test_dropped_site_leaves_exact_sum_of_rest(tmp_path, stage):
    names = ["a", "b", "c", "d", "e"]
    data = site_data(names, seed=3)
    setup = recommended_setup("drop", names, layout(data))
    result, ex = run(setup, make_sites(tmp_path, data), drop={"c": stage})
    # dropped before its vector: the sum of the rest; after: its vector is in the sum
    summed = [n for n in names if n != "c"] if stage == "secagg_masked_vector" else names
    assert list(result.survivors) == summed
    assert result.dropped == (("c",) if stage == "secagg_masked_vector" else ())
    truth, simulated = exact(data, summed), simulate_sum(setup, {n: data[n] for n in summed})
    for k, value in result.tensors.items():
        assert np.abs(value - truth[k]).max() <= result.tolerance[k]
        assert np.array_equal(value, simulated[k])


def test_three_sites_one_dropped_fails_round(tmp_path):
    data = site_data(["a", "b", "c"])
    with pytest.raises(RoundFailed, match="2 sites left"):
        run(
            recommended_setup("r", ["a", "b", "c"], layout(data)),
            make_sites(tmp_path, data),
            drop={"c": "secagg_masked_vector"},
        )


def test_sums_differing_by_one_site_refused(tmp_path):
    names = ["a", "b", "c", "d"]
    data = site_data(names, seed=4)
    spec = layout(data)
    run(recommended_setup("all", names, spec), make_sites(tmp_path, data))
    # leave-one-site-out: a fresh process at each site (history read from its folder) refuses it
    _, ex = (None, LocalExchange(make_sites(tmp_path, data)))
    with pytest.raises(RoundFailed):
        run_secure_sum(SecAggCoordinator(recommended_setup("loo", ["a", "b", "c"], spec)), ex)
    assert set(ex.refusals) == {"a", "b", "c"}
    assert all("differs by one site (d)" in r for r in ex.refusals.values())
    # a retry in which d "drops": every site in both sums refuses to unmask, no share leaves
    ex = LocalExchange(make_sites(tmp_path, data), drop={"d": "secagg_masked_vector"})
    with pytest.raises(RoundFailed):
        run_secure_sum(SecAggCoordinator(recommended_setup("retry", names, spec)), ex)
    assert set(ex.refusals) == {"a", "b", "c"}
    assert not any(d == "from" and s == "secagg_unmask" for d, _, s, _ in ex.wire)
    history = json.loads((tmp_path / "a" / HISTORY_FILE).read_text())
    assert [r["round_id"] for r in history["unnoised"]] == ["all"] and history["sums_joined"] == 2


def test_changed_weights_on_one_site_refused(tmp_path):
    names = ["a", "b", "c"]
    data = site_data(names, seed=5)
    run(recommended_setup("w1", names, layout(data)), make_sites(tmp_path, data))
    ex = LocalExchange(make_sites(tmp_path, data))
    weights = {"a": 1.0, "b": 2.0, "c": 1.0}  # minus the first sum: exactly site b's vector
    with pytest.raises(RoundFailed):
        run_secure_sum(SecAggCoordinator(recommended_setup("w2", names, layout(data), weights=weights)), ex)
    assert set(ex.refusals) == set(names) and all("site b" in r for r in ex.refusals.values())


def test_noised_sums_allowed_and_charged(tmp_path):
    names = ["a", "b", "c", "d"]
    data = site_data(names, seed=6)
    charged = []
    run(recommended_setup("all", names, layout(data)), make_sites(tmp_path, data))
    setup = recommended_setup("loo", ["a", "b", "c"], layout(data), mode="secure+dp", noise_multiplier=1.0)
    result, ex = run(setup, make_sites(tmp_path, data, charge=charged.append, noise=1.0))
    assert not ex.refusals and result.survivors == ("a", "b", "c")
    assert sorted(r.participants for r in charged) == [("a", "b", "c")] * 3
    assert {r.noise_multiplier for r in charged} == {1.0}

    def refuse(release):
        raise MedmergeError("budget exceeded")

    for charge, noise, why in [
        (refuse, 1.0, "privacy ledger"),
        (charged.append, 0.5, "noise"),
        (None, 1.0, "ledger"),
    ]:
        ex = LocalExchange(make_sites(tmp_path / why, data, charge=charge, noise=noise))
        with pytest.raises(RoundFailed):
            run_secure_sum(SecAggCoordinator(setup), ex)
        assert all(why in r for r in ex.refusals.values()) and set(ex.refusals) == {"a", "b", "c"}


def test_budget_of_sums_is_persistent(tmp_path):
    names = ["a", "b", "c"]
    data = site_data(names)
    policy = SitePolicy(max_sums=1)
    run(recommended_setup("one", names, layout(data)), make_sites(tmp_path, data, policy=policy))
    ex = LocalExchange(make_sites(tmp_path, data, policy=policy))
    with pytest.raises(RoundFailed):
        run_secure_sum(SecAggCoordinator(recommended_setup("one", names, layout(data))), ex)
    assert all("budget of 1" in r for r in ex.refusals.values())


def test_tampered_token_detected_round_completes(tmp_path):
    names = ["a", "b", "c", "d", "e"]
    data = site_data(names, seed=7)
    local = LocalExchange(make_sites(tmp_path, data))

    def exchange(requests):
        first = next(iter(requests.values()))
        if isinstance(first, MaskedVectorRequest):  # the relay flips one byte of a's token to b
            token = bytearray(requests["b"].tokens["a"])
            token[40] ^= 1
            requests["b"] = MaskedVectorRequest(tokens={**requests["b"].tokens, "a": bytes(token)})
        return local(requests)

    setup = recommended_setup("tamper", names, layout(data))
    result = run_secure_sum(SecAggCoordinator(setup), exchange)
    masked = [json.loads(d) for dr, s, st, d in local.wire if dr == "from" and st == "secagg_masked_vector"]
    assert [m["undecryptable"] for m in masked].count(["a"]) == 1
    truth = exact(data, names)
    assert result.survivors == tuple(names) and not local.refusals
    assert all(np.abs(result.tensors[k] - truth[k]).max() <= result.tolerance[k] for k in truth)


def test_wrong_share_outvoted(tmp_path):
    """A site that sends a corrupted share at unmask spoils only the t-subsets that hold it."""
    names = ["a", "b", "c", "d", "e"]
    data = site_data(names, seed=8)
    local = LocalExchange(make_sites(tmp_path, data))

    def exchange(requests):
        replies = local(requests)
        if isinstance(replies.get("a"), UnmaskReply):  # a: in the first t-subset tried
            bad = {u: s[:4] + bytes(len(s) - 4) for u, s in replies["a"].b_shares.items()}
            replies["a"] = UnmaskReply(b_shares=bad, sk_shares={})
        return replies

    result = run_secure_sum(SecAggCoordinator(recommended_setup("bad", names, layout(data))), exchange)
    truth = exact(data, names)
    assert all(np.abs(result.tensors[k] - truth[k]).max() <= result.tolerance[k] for k in truth)


def test_records_refuse_bad_fields():
    spec = layout(site_data(["a"]))
    good = recommended_setup("r", ["a", "b", "c"], spec).model_dump()
    bad = [
        {"levels": 2**31, "modulus_bits": 32},  # 3 × 2^31 ≥ 2^32: the sum would wrap
        {"participants": ("a", "b", "../c")},
        {"threshold": 1},
        {"extra": 1},
        {"mode": "secure+dp"},  # without a noise multiplier
        {"weights": {"a": float("nan"), "b": 1.0, "c": 1.0}},
        {"layout": ({**good["layout"][0], "clip": float("inf")},)},
        {"layout": ({**good["layout"][0], "name": "a..b"},)},
    ]
    for change in bad:
        with pytest.raises(ValueError):
            SetupRequest.model_validate({**good, **change})
    with pytest.raises(ValueError):
        MaskedVectorRequest(tokens={"a": b"x" * 5000})


def test_site_stages_in_order_and_secrets_stay(tmp_path):
    names = ["a", "b", "c"]
    data = site_data(names)
    site = make_sites(tmp_path, data)["a"]
    with pytest.raises(SecAggRefused, match="expecting setup"):
        site.handle(UnmaskRequest(survivors=("a", "b", "c")))
    sites = make_sites(tmp_path, data)
    sites["a"].handle(recommended_setup("r", names, layout(data)))
    assert repr(sites["a"]) == "SecAggSite('a', stage='share_keys')"
    with pytest.raises(TypeError):
        pickle.dumps(sites["a"])
    run(recommended_setup("r2", names, layout(data)), make_sites(tmp_path, data))
    for n in names:  # a site writes its history only: no key, seed or share
        assert [p.name for p in (tmp_path / n).iterdir()] == [HISTORY_FILE]
        assert "PRIVATE" not in (tmp_path / n / HISTORY_FILE).read_text()


@pytest.mark.parametrize("levels", [2**30, 2**44])
def test_finest_levels_round_within_tolerance(levels):
    """Float64 forms w·x·L/(2c) within a few ulp; at L ≤ 2^44 that stays far inside the K·Δ/2 bound.
    (simulate_sum is the protocol's arithmetic bit for bit: test_sum_within_quantization_tolerance.)"""
    rng = np.random.default_rng(9)
    names = ["a", "b", "c", "d", "e"]
    data = {n: {"x": rng.uniform(-3.7, 3.7, 200_000).astype(np.float32)} for n in names}
    weights = {n: w for n, w in zip(names, [0.3, 0.7, 1.1, 0.9, 0.45], strict=True)}
    spec = [spec_for("x", data["a"]["x"], 3.7 * 1.1)]
    setup = recommended_setup("fine", names, spec, modulus_bits=64, levels=levels, weights=weights)
    err = np.abs(simulate_sum(setup, data)["x"] - exact(data, names, weights)["x"]).max()
    bound = len(names) * (2 * 3.7 * 1.1 / levels) / 2
    assert err <= bound * (1 + 2**-7)


def test_failing_contribution_refused_without_its_text(tmp_path):
    names = ["a", "b", "c", "d"]
    data = site_data(names, seed=10)
    sites = make_sites(tmp_path, data)

    def broken(setup):
        raise FileNotFoundError("/data/site-d/private_questions.jsonl")

    sites["d"] = SecAggSite("d", tmp_path / "d", broken)
    result, ex = run(recommended_setup("fail", names, layout(data)), sites)
    assert ex.refusals == {"d": "site d: masked_vector failed (FileNotFoundError)"}
    assert result.survivors == ("a", "b", "c") and result.dropped == ("d",)
    truth = exact(data, ["a", "b", "c"])
    assert all(np.abs(result.tensors[k] - truth[k]).max() <= result.tolerance[k] for k in truth)


def test_sparse_graph_with_dropouts(tmp_path):
    """SecAgg+'s ring: 7 sites, each masks with and shares among its 4 nearest; two drop."""
    names = [f"s{i}" for i in range(7)]
    data = site_data(names, seed=11)
    full = recommended_setup("ring", names, layout(data)).model_dump()
    setup = SetupRequest.model_validate({**full, "neighbours": 4, "threshold": 3})
    assert setup.neighbours_of("s0") == ("s1", "s2", "s5", "s6")
    drop = {"s2": "secagg_masked_vector", "s5": "secagg_unmask"}
    result, ex = run(setup, make_sites(tmp_path, data), drop=drop)
    summed = [n for n in names if n != "s2"]
    assert list(result.survivors) == summed and result.dropped == ("s2",)
    truth = exact(data, summed)
    assert all(np.abs(result.tensors[k] - truth[k]).max() <= result.tolerance[k] for k in truth)
    keys = [
        json.loads(d) for dr, s, st, d in ex.wire if dr == "to" and s == "s0" and st == "secagg_share_keys"
    ]
    assert sorted(keys[0]["public_keys"]) == ["s0", "s1", "s2", "s5", "s6"]  # s3, s4 never see s0's keys


def test_nan_contribution_refused_before_it_is_charged(tmp_path):
    names = ["a", "b", "c", "d"]
    data = site_data(names, seed=12)
    data["d"]["fisher"][3] = np.nan
    charged = []
    setup = recommended_setup("nan", names, layout(data), mode="secure+dp", noise_multiplier=1.0)
    result, ex = run(setup, make_sites(tmp_path, data, charge=charged.append, noise=1.0))
    assert "NaN" in ex.refusals["d"] and result.survivors == ("a", "b", "c")
    assert sorted(r.participants for r in charged) == [tuple(names)] * 3  # d spent nothing
    assert not (tmp_path / "d" / HISTORY_FILE).exists()  # nor counted a sum
