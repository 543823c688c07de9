"""`medmerge federate` end to end: a real SuperLink and two SuperNodes (separate processes, TLS and
SuperNode authentication, a resident worker per site) on 127.0.0.1, tiny random models and tiny data:
train → exchange → 2-trial search → 2 FedAvg rounds → evaluation → verdict; the coordinator's merge
equals `merge_models`'; bytes per approach; no canary leaks. A second test (slow) kills one site's
SuperNode with kill -9 mid-search: the study finishes with the others and says so."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from medmerge.federated.config import FederatedConfig  # noqa: E402
from medmerge.federated.launcher import LocalFederation  # noqa: E402

TOPICS = {"north": ["hypertension", "angina", "stroke"], "south": ["eczema", "psoriasis", "acne"]}


def canary(site: str, i: int) -> str:
    return f"CANARY{site.upper()}{i:03d}ZQ"


def write_site(path: Path, site: str, n: int = 30) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            topic = TOPICS[site][i % 3]
            row = {
                "question": f"What helps {topic}? {canary(site, i)}",
                "answer": f"For {topic} rest. {canary(site, i)}a",
            }
            f.write(json.dumps(row) + "\n")
    return path


def study(root: Path, base: Path, sites=tuple(TOPICS), trials: int = 2, **federation) -> FederatedConfig:
    return FederatedConfig.model_validate(
        {
            "base_model": str(base),
            "sites": [
                {"name": s, "data": [f"jsonl:{write_site(root / f'{s}.jsonl', s.split('-')[0])}"]}
                for s in sites
            ],
            "fractions": [0.6, 0.2, 0.2],
            "threads": 1,
            "train": {
                "method": "lora",
                "max_steps": 3,
                "batch_size": 8,
                "learning_rate": 0.01,
                "eval_every": 0,
                "checkpoint_every": 0,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "autocast": "off",
            },
            "methods": ["task_arithmetic"],
            "search": {"trials": trials, "validation_examples": 4, "seed": 0},
            "evaluate": {"max_examples": 4},
            "federation": {"per_question": True, "reply_timeout_s": 300, **federation},
        }
    )


def test_federation_quick(tmp_path, tiny_llama):
    """The default suite's real-process federation: TLS, auth, workers; 1 search trial, no FedAvg."""
    config = study(tmp_path, tiny_llama, trials=1)
    started = time.time()
    with LocalFederation(config, tmp_path / "fed") as federation:
        verdict_path = federation.run(timeout=240)
    print(f"quick federation: {time.time() - started:.1f}s")
    verdict = json.loads(verdict_path.read_text())["verdict"]
    assert verdict["chosen_merge"] == "task_arithmetic" and not verdict["dropped_sites"]
    assert set(verdict["bytes_by_approach"]) == {"one_shot", "evaluation"} and verdict["fedavg"] is None


@pytest.mark.slow
def test_federation_end_to_end(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    from medmerge.federated.site import recipe_config
    from medmerge.merge import merge_models

    config = study(tmp_path, tiny_llama, fedavg={"rounds": 2, "local_steps": 2})
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
    assert set(verdict["bytes"]["sent_to_site"]) == set(TOPICS) and not verdict["dropped_sites"]
    approaches = verdict["bytes_by_approach"]
    assert set(approaches) == {"one_shot", "fedavg", "evaluation"}
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
    experts = [str(coordinator / "experts" / s) for s in TOPICS]
    merge_models(
        recipe_config(search["best"]["recipe"], str(tiny_llama), experts), tmp_path / "again", progress=False
    )
    ours = load_file(next((coordinator / "merges" / "task_arithmetic").glob("*.safetensors")))
    theirs = load_file(next((tmp_path / "again").glob("*.safetensors")))
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) == 0.0

    # privacy canaries: nothing the coordinator wrote or logged, nothing on the wire
    leaked = []
    places = [p for p in coordinator.rglob("*") if p.is_file()] + [out / "logs" / "superlink.log"]
    places += [p for s in TOPICS for p in (federation.site_dir(s) / "wire").rglob("*") if p.is_file()]
    assert any("wire" in str(p) for p in places)
    for path in places:
        data = path.read_bytes()
        if b"CANARY" in data:
            leaked.append(str(path))
    assert not leaked
    # the canaries are real: the sites' own files do hold them
    assert b"CANARY" in (tmp_path / "north.jsonl").read_bytes()


@pytest.mark.slow
def test_a_site_killed_mid_search_is_dropped(tmp_path, tiny_llama):
    sites = ("north", "south", "north-2")
    config = study(tmp_path, tiny_llama, sites, trials=3, reply_timeout_s=45, min_sites=2)

    def kill_after_exchange(federation: LocalFederation) -> None:
        stored = federation.site_dir("south") / "peers" / "order.json"
        if stored.is_file() and federation.procs["supernode-south"].poll() is None:
            federation.kill_site("south")  # kill -9 its SuperNode mid-search

    with LocalFederation(config, tmp_path / "fed") as federation:
        verdict_path = federation.run(timeout=600, on_poll=kill_after_exchange)
    verdict = json.loads(verdict_path.read_text())["verdict"]
    # killed right after storing its peers: its reply to the exchange may or may not have gone out
    assert set(verdict["dropped_sites"]) == {"south"}
    assert verdict["dropped_sites"]["south"].startswith(("exchange", "search"))
    assert all(set(r["test_loss_per_site"]) == {"north", "north-2"} for r in verdict["table"])
    assert {r["model"] for r in verdict["table"]} >= {"base", "north", "north-2", "task_arithmetic"}
    report = (verdict_path.parent / "report.md").read_text()
    assert "Sites dropped" in report and "south" in report
    leftovers = [p for p in (tmp_path / "fed" / "coordinator").rglob("*") if ".tmp" in p.name]
    assert not leftovers  # every output was written atomically
