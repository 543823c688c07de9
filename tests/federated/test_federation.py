"""`medmerge federate` end to end: a real SuperLink and one SuperNode per site (separate processes, TLS
and SuperNode authentication, a resident worker per site) on 127.0.0.1, tiny random models and tiny
data. The slow end-to-end test: two expert sites and an evaluate-only node holding an out-of-domain
PubMedQA set; train → exchange → 2-trial search → 2 FedAvg rounds → evaluation → leave-one-site-out →
verdict; the coordinator's merge equals `merge_models`'; bytes per approach; no canary leaks, on the
wire or at the coordinator. A second slow test kills one site's SuperNode with kill -9 mid-search: the
study finishes with the others, says which site was dropped, at which step, when and why, and leaves
nothing half-written."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("flwr")

from medmerge.federated.launcher import LocalFederation  # noqa: E402
from tests.federated.common import TOPICS, study, with_evaluator, write_pubmedqa  # noqa: E402


def test_federation_quick(tmp_path, tiny_llama):
    """The default suite's real-process federation: TLS, auth, workers that train in child processes
    (the default); 1 search trial, no FedAvg."""
    config = study(tmp_path, tiny_llama, trials=1, isolate=True)
    started = time.time()
    with LocalFederation(config, tmp_path / "fed") as federation:
        verdict_path = federation.run(timeout=240)
    print(f"quick federation: {time.time() - started:.1f}s")
    verdict = json.loads(verdict_path.read_text())["verdict"]
    assert verdict["chosen_merge"] == "task_arithmetic" and not verdict["dropped_sites"]
    assert set(verdict["bytes_by_approach"]) == {"one_shot", "evaluation"} and verdict["fedavg"] is None
    # the signed app ran at SuperNodes that trust only the publisher's key; each site is its node id
    coordinator = verdict_path.parent
    bound = {s["name"]: s["node_id"] for s in json.loads((coordinator / "config.yaml").read_text())["sites"]}
    assert bound == federation.nodes and len(set(bound.values())) == 2
    status = json.loads((coordinator / "status.json").read_text())
    assert (
        status["state"] == "finished" and status["refused"] == [] and status["heartbeat"] >= status["started"]
    )
    assert all(
        "--trusted-entities" in p.args for n, p in federation.procs.items() if n.startswith("supernode")
    )


@pytest.mark.slow
def test_federation_end_to_end(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    from medmerge.merge import merge_models
    from medmerge.merge.recipe import Recipe

    config = study(tmp_path, tiny_llama, fedavg={"rounds": 2, "local_steps": 2}, leave_one_out=True)
    ood = write_pubmedqa(tmp_path / "pqal.json")
    config = with_evaluator(config, ood)
    out = tmp_path / "fed"
    started = time.time()
    with LocalFederation(config, out, wire_log=True) as federation:
        up = time.time()
        verdict_path = federation.run(timeout=240)
        done = time.time()
    print(
        f"federation: up {up - started:.1f}s, study {done - up:.1f}s, "
        f"stopped {time.time() - done:.1f}s; {out}"
    )
    verdict = json.loads(verdict_path.read_text())["verdict"]
    assert verdict["chosen_merge"] == "task_arithmetic" and verdict["best_expert"] in TOPICS
    assert {r["model"] for r in verdict["table"]} == {"base", "north", "south", "task_arithmetic", "fedavg"}
    assert set(verdict["bytes"]["sent_to_site"]) == {*TOPICS, "clinic"} and not verdict["dropped_sites"]
    approaches = verdict["bytes_by_approach"]
    assert set(approaches) == {"one_shot", "fedavg", "evaluation", "leave_one_out"}
    # out of domain at the evaluate-only node (it evaluates the FedAvg model too); leave-one-site-out
    assert verdict["out_of_domain_sets"] == ["clinic:pubmedqa"]
    assert all(r["out-of-domain:loss"] and r["out-of-domain:accuracy"] is not None for r in verdict["table"])
    loso = {r["held_out"]: r for r in verdict["leave_one_site_out"]}
    assert loso["north"]["experts"] == ["south"] and loso["south"]["experts"] == ["north"]
    assert all(r["weights_match_coordinator"] for r in loso.values())
    assert verdict["merges_sha256"]["task_arithmetic"]["sites_agree"] == [*TOPICS, "clinic"]
    print({k: {d: v[d]["north"] for d in v} for k, v in approaches.items()})
    fedavg = verdict["fedavg"]
    assert len(fedavg["rounds"]) == 2 and max(r["max_svd_error"] for r in fedavg["rounds"]) < 1e-5
    # the sites' global FedAvg model is the coordinator's
    theirs = load_file(next((federation.site_dir("north") / "fedavg" / "global").glob("*.safetensors")))
    ours = load_file(next((out / "coordinator" / "fedavg" / "model").glob("*.safetensors")))
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-6
    coordinator = out / "coordinator"
    search = json.loads((coordinator / "search" / "task_arithmetic.json").read_text())
    assert len(search["trials"]) == 2
    experts = {s: str(coordinator / "experts" / s) for s in TOPICS}
    recipe = Recipe.model_validate(search["best"]["recipe"])
    merge_models(recipe.merge_config(str(tiny_llama), experts), tmp_path / "again", progress=False)
    ours = load_file(next((coordinator / "merges" / "task_arithmetic").glob("*.safetensors")))
    theirs = load_file(next((tmp_path / "again").glob("*.safetensors")))
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) == 0.0

    # privacy canaries: nothing the coordinator wrote or logged, nothing on the wire
    leaked = []
    places = [p for p in coordinator.rglob("*") if p.is_file()] + [out / "logs" / "superlink.log"]
    places += [
        p for s in (*TOPICS, "clinic") for p in (federation.site_dir(s) / "wire").rglob("*") if p.is_file()
    ]
    assert any("wire" in str(p) for p in places)
    for path in places:
        data = path.read_bytes()
        if b"CANARY" in data:
            leaked.append(str(path))
    assert not leaked
    # the canaries are real: the sites' own files do hold them
    assert b"CANARY" in (tmp_path / "north.jsonl").read_bytes() and b"CANARYPUBMED" in ood.read_bytes()


@pytest.mark.slow
def test_a_site_killed_mid_search_is_dropped(tmp_path, tiny_llama):
    sites = ("north", "south", "north-2")
    config = study(tmp_path, tiny_llama, sites, trials=3, reply_timeout_s=45, min_sites=2, leave_one_out=True)

    def kill_after_exchange(federation: LocalFederation) -> None:
        stored = federation.site_dir("south") / "peers" / "order.json"
        if stored.is_file() and federation.procs["supernode-south"].poll() is None:
            federation.kill_site("south")  # kill -9 its SuperNode mid-search

    started = time.time()
    with LocalFederation(config, tmp_path / "fed") as federation:
        verdict_path = federation.run(timeout=600, on_poll=kill_after_exchange)
    print(f"federation with a site killed: {time.time() - started:.1f}s")
    coordinator = verdict_path.parent
    verdict = json.loads(verdict_path.read_text())["verdict"]
    # killed right after storing its peers: its reply to the exchange may or may not have gone out
    assert set(verdict["dropped_sites"]) == {"south"}
    step = verdict["dropped_sites"]["south"]
    assert step.startswith(("exchange", "search"))
    drop = verdict["dropped"]["south"]  # which step, when, why
    assert drop["step"] == step and drop["reason"] == "no reply within 45 s" and drop["after_s"] > 0
    assert time.strptime(drop["at"], "%Y-%m-%dT%H:%M:%SZ")
    assert all(set(r["test_loss_per_site"]) == {"north", "north-2"} for r in verdict["table"])
    assert {r["model"] for r in verdict["table"]} >= {"base", "north", "north-2", "task_arithmetic"}
    report = (coordinator / "report.md").read_text()
    assert (
        "Sites dropped" in report and f"- south: at `{step}`" in report and "no reply within 45 s" in report
    )
    status = json.loads((coordinator / "status.json").read_text())
    assert status["state"] == "finished" and set(status["dropped"]) == {"south"}
    # leave-one-site-out goes on without it: its own row is skipped, the others' searches score at the rest
    loso = {r["held_out"]: r for r in verdict["leave_one_site_out"]}
    assert loso["south"]["skipped"].startswith("dropped at")
    for held in ("north", "north-2"):
        search = json.loads((coordinator / "loso" / held / "search" / "task_arithmetic.json").read_text())
        assert search["scored_by"] == [s for s in ("north", "north-2") if s != held]
        assert loso[held]["merge_test_loss"] > 0
    # nothing half-written: no temporary names left, every output folder complete
    leftovers = [
        p for p in (tmp_path / "fed" / "coordinator").rglob("*") if ".tmp" in p.name or ".old-" in p.name
    ]
    assert not leftovers
    for folder in (coordinator / "experts").iterdir():
        assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert list((coordinator / "merges" / "task_arithmetic").glob("*.safetensors"))


SLOT_USER = """
import json, sys, time
from pathlib import Path
from medmerge.federated.slots import configure, training_slot
folder, site = Path(sys.argv[1]), sys.argv[2]
provisional_after_s, hold_s = float(sys.argv[3]), float(sys.argv[4])
configure(folder, site, provisional_after_s=provisional_after_s)
with training_slot("expert"):
    start = time.time()
    held = b"\\x01" * (200 * 2**20)  # 200 MiB, touched
    time.sleep(hold_s)
    end = time.time()
(folder / f"{site}.times").write_text(json.dumps([start, end]))
"""


def test_memory_slots_bound_how_many_sites_train_at_once(tmp_path):
    """Two site processes, one slot (peak not yet measured): one trains after the other, and the one
    that waits says so (its log and the waiting notice the launcher prints); the 200 MiB it held is
    measured as the per-training peak. With a configured peak that fits twice, they train together."""
    import subprocess
    import sys

    from medmerge.federated.slots import limit, write_budget

    for budget, peak, together in ((100 * 2**20, None, False), (2 * 2**30, 2**30, True)):
        folder = tmp_path / f"slots-{together}"
        write_budget(folder, budget, peak)
        assert limit(folder)[0] == (2 if together else 1)
        argv = [sys.executable, "-c", SLOT_USER, str(folder)]
        procs = [
            subprocess.Popen([*argv, s, "60", "2"], stderr=subprocess.PIPE, text=True)
            for s in ("north", "south")
        ]
        logs = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), logs
        (a0, a1), (b0, b1) = (json.loads((folder / f"{s}.times").read_text()) for s in ("north", "south"))
        assert (a0 < b1 and b0 < a1) == together  # the two trainings overlap in time only with 2 slots
        waited = [log for log in logs if "waits for memory (1 training(s) at a time" in log]
        assert len(waited) == (0 if together else 1)
        assert not list((folder / "waiting").iterdir())  # notices are gone once the slot is taken
        peaks = [
            json.loads((folder / "peaks" / f"{s}.json").read_text())["peak_bytes"] for s in ("north", "south")
        ]
        assert min(peaks) > 150 * 2**20  # the 200 MiB each held, measured


def test_a_running_trainings_provisional_peak_lets_the_next_one_start(tmp_path):
    """No peak configured or measured yet: the first training holds the only slot, but once it has run
    `provisional_after_s` its running peak × PROVISIONAL_MARGIN stands in, and where the budget holds two
    the second site starts while the first still trains (not after it, as without the provisional peak);
    the measured peak then replaces the provisional one."""
    import subprocess
    import sys
    import time

    from medmerge.federated.slots import PROVISIONAL_MARGIN, limit, write_budget

    folder = tmp_path / "slots"
    write_budget(folder, 2 * 2**30, None)
    argv = [sys.executable, "-c", SLOT_USER, str(folder)]
    first = subprocess.Popen([*argv, "north", "1", "8"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while (
        not list((folder / "provisional").glob("*.json")) and first.poll() is None and time.time() < deadline
    ):
        time.sleep(0.2)  # north holds the only slot until its running peak is recorded
    second = subprocess.Popen([*argv, "south", "1", "1"], stderr=subprocess.PIPE, text=True)
    logs = [p.communicate(timeout=120)[1] for p in (first, second)]
    assert all(p.returncode == 0 for p in (first, second)), logs
    (a0, a1), (b0, b1) = (json.loads((folder / f"{s}.times").read_text()) for s in ("north", "south"))
    assert a0 < b0 < a1  # south trained while north still held its slot
    assert not list((folder / "provisional").iterdir())  # measured peaks replaced them
    peaks = [
        json.loads((folder / "peaks" / f"{s}.json").read_text())["peak_bytes"] for s in ("north", "south")
    ]
    assert min(peaks) > 150 * 2**20 and limit(folder)[0] >= 2
    assert PROVISIONAL_MARGIN > 1


def test_a_dead_or_silent_coordinator_ends_the_wait(tmp_path):
    """The launcher's liveness check: a coordinator whose process is gone, or whose heartbeat is older
    than STALE_S, ends `run` with one line that says how to resume (the real kill -9 is in
    test_attacks.py)."""
    import os
    import subprocess
    import sys

    from medmerge.errors import MedmergeError
    from medmerge.federated.launcher import STALE_S
    from tests.federated.common import study

    federation = LocalFederation(study(tmp_path, tmp_path), tmp_path / "fed")
    superlink = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    federation.procs["superlink"] = superlink
    try:
        now = time.time()
        federation._check_alive({"pid": os.getpid(), "heartbeat": now}, now)  # alive and beating
        federation._check_alive({}, now)  # not started yet, within START_S
        cases = {
            "is gone": {"pid": dead.pid, "heartbeat": now},
            "has not beaten for": {"pid": os.getpid(), "heartbeat": now - STALE_S - 1},
        }
        for says, state in cases.items():
            with pytest.raises(MedmergeError, match=says) as failure:
                federation._check_alive(state, now)
            assert "\n" not in str(failure.value) and str(failure.value).endswith("--resume")
    finally:
        superlink.kill()
        superlink.wait()
