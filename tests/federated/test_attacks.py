"""A federation that holds against a dishonest party: each hole of issue 21 as an attack, run against real
messages (the in-process LocalSend of test_inprocess: every request and reply crosses as the wire
format's bytes, each site answers from its own config copy), asserting the outcome — the file not
written, the site dropped and named, the study finished — not only a log line.

Protocol-level attacks (this part):
- one study with six dishonest or failing sites beside two honest ones (`dishonest_study`): a FedAvg
  update with path-traversal blob names, a score reply claiming another site's name, a NaN, an unknown
  key, an oversized blob, an error whose text holds a path and a data record; each is dropped with
  one line and the study finishes with the honest two;
- a site over its query budget (after that study), across a worker restart;
- `..` and `/` names sent to a site (peers, recipe experts, evaluated models, statistics peer);
- a kill -9 of the coordinator mid-search and a resume.
Attacks where Flower itself is involved (real processes) are further below, in their own functions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from medmerge.errors import MedmergeError
from medmerge.federated.config import FederatedConfig
from medmerge.federated.coordinator import Exchange, run_study
from medmerge.federated.launcher import LocalFederation
from medmerge.federated.wire import Payload
from tests.federated.common import study
from tests.federated.conftest import PROBE_APP, ran, run_probe
from tests.federated.test_inprocess import LocalSend

HONEST = ("north", "south")
TRAVERSAL, IMPOSTOR, NAN, UNKNOWN_KEY, OVERSIZED, LEAKY = (
    "north-2",
    "south-2",
    "north-3",
    "south-3",
    "north-4",
    "south-4",
)
SECRET = "CANARYRECORDSECRET"


def _with_blobs(reply: Payload, extra: dict[str, bytes]) -> Payload:
    return Payload(reply.kind, reply.meta, {**reply.blobs, **extra})


@pytest.fixture(scope="module")
def dishonest_study(tmp_path_factory, tiny_llama):
    """Two honest expert sites and six others, each misbehaving at its own step (module doc)."""
    import tempfile

    root = tmp_path_factory.mktemp("dishonest")
    sites = (*HONEST, TRAVERSAL, IMPOSTOR, NAN, UNKNOWN_KEY, OVERSIZED, LEAKY)
    config = study(root, tiny_llama, sites, trials=2, fedavg={"rounds": 1, "local_steps": 1})
    data = config.model_dump(mode="json")
    data["federation"]["budget"] = {"score": 3}
    leaky = root / "leaky.csv"  # header-less: the loader's error quotes the first record
    leaky.write_text(f"What helps {SECRET}?,Rest {SECRET}\nWhat else?,Sleep\n" * 5)
    data["sites"][-1]["data"] = [f"csv:{leaky}"]
    config = FederatedConfig.model_validate(data)

    scratch = root / "deep" / "down" / "tmp"  # where the coordinator's temporary folders go
    scratch.mkdir(parents=True)
    outside = {"relative": scratch.parent / "x", "absolute": root / "abs" / "evil.pth"}
    outside["absolute"].parent.mkdir()  # so that nothing but the protocol stops the write

    def traversal(request: Payload, reply: Payload) -> Payload:
        if request.kind == "fedavg" and reply.blobs:
            evil = {"../../x": b"evil", str(outside["absolute"]): b"import os  # runs at start-up"}
            return _with_blobs(reply, evil)
        return reply

    def impostor(request: Payload, reply: Payload) -> Payload:
        if request.kind == "score":  # claims to be north, with a loss that would steer the search
            return Payload("score", {**reply.meta, "site": "north", "nll_sum": 0.0})
        return reply

    def nan(request: Payload, reply: Payload) -> Payload | bytes:
        if request.kind != "score":
            return reply
        header = {"meta": {"kind": "score", **reply.meta, "nll_sum": float("nan")}, "blobs": []}
        text = json.dumps(header).encode()  # json.dumps writes NaN
        assert b"NaN" in text
        return len(text).to_bytes(8, "big") + text

    def unknown_key(request: Payload, reply: Payload) -> Payload:
        return (
            Payload(reply.kind, {**reply.meta, "note": "x"}, reply.blobs)
            if request.kind == "train"
            else reply
        )

    def oversized(request: Payload, reply: Payload) -> Payload:
        if request.kind == "train" and reply.kind == "train":
            padded = reply.blobs["adapter_config.json"] + b" " * (100 << 10)  # still valid JSON
            return _with_blobs(reply, {"adapter_config.json": padded})
        return reply

    tamper = {TRAVERSAL: traversal, IMPOSTOR: impostor, NAN: nan, UNKNOWN_KEY: unknown_key}
    send = LocalSend(config, root / "sites", tamper | {OVERSIZED: oversized})
    out = root / "coordinator"
    exchange = Exchange(send, list(sites), 2)
    printed, logged = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(logged):
            verdict_path = run_study(config.for_party(None), out, exchange)
    return {
        "root": root,
        "out": out,
        "send": send,
        "verdict": json.loads(verdict_path.read_text())["verdict"],
        "printed": printed.getvalue(),
        "logged": logged.getvalue(),
        "outside": outside,
        "config": config,
        "leaky": leaky,
    }


def _dropped(result: dict, site: str) -> tuple[str, str]:
    """(step, reason) of `site`'s drop, and check the one printed line that named it."""
    drop = result["verdict"]["dropped"][site]
    lines = [line for line in result["printed"].splitlines() if f"site {site} dropped" in line]
    assert lines == [f"medmerge federate: site {site} dropped at {drop['step']}: {drop['reason']}"]
    return drop["step"], drop["reason"]


def test_the_study_finishes_with_the_honest_sites(dishonest_study):
    verdict = dishonest_study["verdict"]
    assert set(verdict["dropped_sites"]) == {TRAVERSAL, IMPOSTOR, NAN, UNKNOWN_KEY, OVERSIZED, LEAKY}
    assert verdict["chosen_merge"] == "task_arithmetic" and verdict["fedavg"] is not None
    assert set(verdict["table"][0]["test_loss_per_site"]) == set(HONEST)
    report = (dishonest_study["out"] / "report.md").read_text()
    assert "Sites dropped" in report and f"- {TRAVERSAL}: at `fedavg round 0`" in report


def test_a_path_traversal_blob_name_writes_nothing_outside(dishonest_study):
    step, reason = _dropped(dishonest_study, TRAVERSAL)
    assert (
        step == "fedavg round 0"
        and reason.startswith("bad reply (blob ")
        and "not a blob of a fedavg" in reason
    )
    for path in dishonest_study["outside"].values():
        assert not path.exists(), path
    # its update was not averaged: round 0 weighs the honest sites only
    (round0,) = dishonest_study["verdict"]["fedavg"]["rounds"]
    assert set(round0["weights"]) == set(HONEST)


def test_a_reply_claiming_another_site_is_dropped_never_filed_as_it(dishonest_study):
    step, reason = _dropped(dishonest_study, IMPOSTOR)
    assert step == "search task_arithmetic trial 0" and "claims to be 'north'" in reason
    search = json.loads((dishonest_study["out"] / "search" / "task_arithmetic.json").read_text())
    for trial in search["trials"]:
        assert IMPOSTOR not in trial["sites"] and trial["sites"]["north"]["nll_sum"] > 0  # north's own
    assert IMPOSTOR not in search["scored_by"] and "north" in search["scored_by"]


def test_a_nan_reply_is_dropped_and_never_wins(dishonest_study):
    step, reason = _dropped(dishonest_study, NAN)
    assert step == "search task_arithmetic trial 0" and "NaN" in reason
    search = json.loads((dishonest_study["out"] / "search" / "task_arithmetic.json").read_text())
    assert all(t["loss"] is not None and NAN not in t["sites"] for t in search["trials"])


def test_an_unknown_key_and_an_oversized_blob_are_dropped(dishonest_study):
    step, reason = _dropped(dishonest_study, UNKNOWN_KEY)
    assert step == "train" and reason == "bad reply (note: Extra inputs are not permitted)"
    step, reason = _dropped(dishonest_study, OVERSIZED)
    assert step == "train" and "blob adapter_config.json" in reason and "over its 65536-byte cap" in reason
    experts = {p.name for p in (dishonest_study["out"] / "experts").iterdir()}
    assert not {UNKNOWN_KEY, OVERSIZED, LEAKY} & experts  # neither adapter was kept, nor sent to the others
    for site in HONEST:
        stored = json.loads((dishonest_study["root"] / "sites" / site / "peers" / "order.json").read_text())
        assert set(stored["order"]) == experts == {*HONEST, TRAVERSAL, IMPOSTOR, NAN}


def test_an_error_carries_its_type_and_code_only(dishonest_study):
    """The leaky site's loader fails with its data path and first record in the message: on the wire
    only {site, error type, code}; its own log keeps the reason."""
    step, reason = _dropped(dishonest_study, LEAKY)
    assert step == "train" and reason == "error (MedmergeError, failed)"
    wire = bytes(dishonest_study["send"].wire)
    assert SECRET.encode() not in wire and str(dishonest_study["leaky"]).encode() not in wire
    assert b'{"code": "failed", "error": "MedmergeError", "kind": "error", "site": "south-4"}' in wire
    logged = [
        line for line in dishonest_study["logged"].splitlines() if line.startswith("medmerge site failed")
    ]
    assert any(LEAKY in line and SECRET in line for line in logged)  # the site's own log says why
    coordinator = dishonest_study["out"]
    assert not [p for p in coordinator.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_a_site_over_its_query_budget_refuses_across_restarts(dishonest_study, capsys):
    """budget.score is 3 in every copy; the study used 2 of north's. One more is answered, the next is
    refused with over_budget (the reason in its log), and a restarted worker still refuses."""
    from medmerge.federated import worker

    root, out = dishonest_study["root"], dishonest_study["out"]
    run = json.loads((out / "run.json").read_text())["run"]
    recipe = json.loads((out / "search" / "task_arithmetic.json").read_text())["best"]["recipe"]
    folder = root / "sites" / "north"

    def ask() -> Payload:
        request = Payload("score", {"run": run, "recipe": recipe})
        return worker.answer(
            "north", str(folder / "config.yaml"), str(folder), Payload.from_bytes(request.to_bytes())
        )

    assert json.loads((folder / "budget.json").read_text())["score"] == 2
    assert ask().kind == "score"
    refused = ask()
    assert refused.meta == {"site": "north", "error": "OverBudget", "code": "over_budget"}
    assert "score budget spent (3 of 3 used" in capsys.readouterr().err
    worker._SITES.clear()  # the worker restarts: a new Site from the same folder
    assert ask().meta["code"] == "over_budget"
    assert json.loads((folder / "budget.json").read_text())["score"] == 3


# ------------------------------------------------------------------------------- names sent to a site
@pytest.fixture()
def site_folder(tmp_path, tiny_llama):
    config = study(tmp_path, tiny_llama, HONEST)
    LocalSend(config, tmp_path / "sites")
    victim = tmp_path / "sites" / "victim"  # a folder beside the site's: peers/../../victim
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return tmp_path / "sites" / "north", victim


def _ask(folder: Path, kind: str, meta: dict, blobs: dict | None = None) -> Payload:
    from medmerge.federated.worker import answer

    request = Payload(kind, {"run": "1" * 32} | meta, blobs or {})
    return answer("north", str(folder / "config.yaml"), str(folder), Payload.from_bytes(request.to_bytes()))


def test_dot_dot_and_slash_names_are_refused_by_the_site(site_folder):
    folder, victim = site_folder
    adapter = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"\x00" * 16}
    recipe = {"method": "task_arithmetic", "parameters": {}, "weights": [1.0], "seed": 0}
    requests = [
        ("adapters", {"order": ["../../victim"]}, {f"../../victim/{f}": b for f, b in adapter.items()}),
        ("adapters", {"order": [str(victim)]}, {f"{victim}/{f}": b for f, b in adapter.items()}),
        ("score", {"recipe": recipe | {"experts": ["../../victim"]}}, {}),
        ("evaluate", {"models": {"m": "../../victim"}}, {}),
        ("evaluate", {"models": {"../m": "base"}}, {}),
        ("statistics", {"peer": ".."}, {"statistics.safetensors": b"", "statistics.json": b"{}"}),
    ]
    for kind, meta, blobs in requests:
        reply = _ask(folder, kind, meta, blobs)
        assert reply.kind == "error" and reply.meta["code"] == "bad_request", (kind, meta)
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not (folder / "peers").exists() and not list(folder.parent.glob(".victim*"))


def test_the_site_checks_names_itself_too(site_folder, tiny_llama):
    """Below the protocol, `Site` refuses a name or a folder outside its own (defence in depth), and a
    site name with a dot is no site name."""
    from medmerge.errors import MedmergeError
    from medmerge.federated.site import Site
    from medmerge.federated.wire import Refused

    folder, victim = site_folder
    site = Site("north", study(folder.parent, tiny_llama, HONEST).for_party("north"), folder)
    adapter = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b""}
    for name in ("..", "../victim", "/abs", "a.b"):
        with pytest.raises(Refused):
            site.store_adapters("1" * 32, {name: adapter}, [])
    with pytest.raises(Refused, match="outside its folder"):
        site.inside("peers", "..", "..", "victim")
    assert (victim / "precious.txt").read_text() == "keep me"
    with pytest.raises(MedmergeError):
        from medmerge.config import validate_config

        validate_config({"sites": [{"name": "a.b"}, {"name": "c"}]}, FederatedConfig, "study")


def test_a_second_exchange_cannot_replace_this_runs_adapters(site_folder):
    """Once a run's adapters are stored, the same run may send them again (a resumed coordinator) but
    not different ones (which the site would then score); a new run replaces them."""
    folder, _ = site_folder
    adapter = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"\x01" * 8}
    other = adapter | {"adapter_model.safetensors": b"\x02" * 8}

    def exchange(run: str, files: dict) -> Payload:
        blobs = {f"south/{f}": b for f, b in files.items()}
        return _ask(folder, "adapters", {"run": run, "order": ["south"], "statistics": []}, blobs)

    assert exchange("a" * 32, adapter).kind == "adapters"
    assert exchange("a" * 32, adapter).kind == "adapters"
    assert exchange("a" * 32, other).meta == {"site": "north", "error": "Refused", "code": "refused"}
    assert (folder / "peers" / "south" / "adapter_model.safetensors").read_bytes() == b"\x01" * 8
    assert exchange("b" * 32, other).kind == "adapters"
    assert (folder / "peers" / "south" / "adapter_model.safetensors").read_bytes() == b"\x02" * 8


def test_score_and_evaluate_only_over_exchanged_adapters(site_folder):
    """Before any exchange in the run, a recipe over a peer, a stored peer and `fedavg` are refused."""
    folder, _ = site_folder
    recipe = {
        "method": "task_arithmetic",
        "parameters": {},
        "weights": [1.0],
        "seed": 0,
        "experts": ["south"],
    }
    assert _ask(folder, "score", {"recipe": recipe}).meta["code"] == "refused"
    for model in ("south", "fedavg"):
        assert _ask(folder, "evaluate", {"models": {"m": model}}).meta["code"] == "refused"


def test_fedavg_state_is_keyed_by_run(site_folder, tiny_llama):
    """A site never trains on another run's global model: a new run's first FedAvg request discards
    it, and `fedavg` is not evaluated in a run that has none."""
    from medmerge.federated.checks import base_shapes
    from medmerge.federated.fedavg import aggregate
    from tests.federated.test_fedavg import MODULES, adapter

    folder, _ = site_folder
    blobs, _ = adapter(base_shapes(tiny_llama), 2, 4.0, MODULES, 0)
    data, _ = aggregate({"north": blobs}, {"north": 1.0})
    first, second = "a" * 32, "b" * 32
    reply = _ask(
        folder, "fedavg", {"run": first, "round": 1, "local_steps": 0}, {"aggregate.safetensors": data}
    )
    assert reply.kind == "fedavg" and (folder / "fedavg" / "global").is_dir()
    assert json.loads((folder / "fedavg" / "applied.json").read_text()) == {"run": first, "round": 1}
    reply = _ask(folder, "fedavg", {"run": second, "round": 0, "local_steps": 0})
    assert reply.kind == "fedavg" and not (folder / "fedavg" / "global").exists()
    assert json.loads((folder / "fedavg" / "applied.json").read_text()) == {"run": second, "round": 0}
    assert _ask(folder, "evaluate", {"run": second, "models": {"m": "fedavg"}}).meta["code"] == "refused"


# ------------------------------------------------------------------------------ kill -9 and resume
class _Logged(LocalSend):
    """LocalSend that appends each request (kind, meta, recipients) to a JSON-lines file, and kills its
    own process with SIGKILL when the `die_at` = (kind, n)-th request of that kind is about to be sent."""

    def __init__(self, config: FederatedConfig, root: Path, log: Path, die_at: tuple | None = None) -> None:
        super().__init__(config, root)
        self.path, self.die_at, self.counts = log, die_at, {}

    def __call__(self, request: Payload, sites: list[str]) -> dict[str, Payload]:
        with open(self.path, "a") as f:
            f.write(json.dumps([request.kind, request.meta, sites]) + "\n")
        self.counts[request.kind] = self.counts.get(request.kind, 0) + 1
        if self.die_at == (request.kind, self.counts[request.kind]):
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9: this request is in flight
        return super().__call__(request, sites)


def _study_that_dies(data: dict, root: str, log: str, die_at: tuple, resume: bool) -> None:
    config = FederatedConfig.model_validate(data)
    send = _Logged(config, Path(root) / "sites", Path(log), die_at)
    out = Path(root) / "coordinator"
    run_study(config.for_party(None), out, Exchange(send, list(HONEST), 2), resume=resume)


def _killed(config: FederatedConfig, root: Path, log: Path, die_at: tuple, resume: bool) -> list[tuple]:
    """The requests a coordinator process sent before it was killed at `die_at` (a child process)."""
    import multiprocessing

    args = (config.model_dump(mode="json"), str(root), str(log), die_at, resume)
    child = multiprocessing.get_context("spawn").Process(target=_study_that_dies, args=args)
    child.start()
    child.join(timeout=600)
    assert child.exitcode == -signal.SIGKILL
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]


def test_a_killed_coordinator_resumes_without_resending_finished_work(tmp_path, tiny_llama):
    """kill -9 of the coordinator in the search's third trial, resume; kill -9 again in FedAvg's second
    round, resume: finished trials, adapters and FedAvg rounds are reused, never sent again."""
    config = study(tmp_path, tiny_llama, HONEST, trials=4, fedavg={"rounds": 2, "local_steps": 1})
    out = tmp_path / "coordinator"
    first = _killed(config, tmp_path, tmp_path / "first.jsonl", ("score", 3), resume=False)
    scored_before = [meta["recipe"] for kind, meta, _ in first if kind == "score"]
    assert [kind for kind, _, _ in first] == ["hello", "train", "adapters", "score", "score", "score"]

    second = _killed(config, tmp_path, tmp_path / "second.jsonl", ("fedavg", 2), resume=True)
    scored_after = [meta["recipe"] for kind, meta, _ in second if kind == "score"]
    assert [kind for kind, _, _ in second] == ["hello", "score", "score", "fedavg", "fedavg"]  # no training
    assert scored_after[0] == scored_before[2]  # the trial in flight, proposed again as it was
    assert not [r for r in scored_after if r in scored_before[:2]]  # finished trials never sent again
    assert [meta["round"] for kind, meta, _ in second if kind == "fedavg"] == [0, 1]

    send = _Logged(config, tmp_path / "sites", tmp_path / "third.jsonl")
    verdict_path = run_study(config.for_party(None), out, Exchange(send, list(HONEST), 2), resume=True)
    third = [tuple(json.loads(line)) for line in (tmp_path / "third.jsonl").read_text().splitlines()]
    assert [kind for kind, _, _ in third] == ["hello", "fedavg", "fedavg", "evaluate"]
    assert [meta["round"] for kind, meta, _ in third if kind == "fedavg"] == [1, 2]  # round 0 reused
    search = json.loads((out / "search" / "task_arithmetic.json").read_text())
    assert [t["trial"] for t in search["trials"]] == [0, 1, 2, 3]
    assert [t["recipe"] for t in search["trials"]] == [*scored_before[:2], *scored_after]
    verdict = json.loads(verdict_path.read_text())["verdict"]
    assert verdict["chosen_merge"] == "task_arithmetic" and not verdict["dropped_sites"]
    assert [r["round"] for r in verdict["fedavg"]["rounds"]] == [0, 1]
    assert len({meta["run"] for _, meta, _ in first + second + third}) == 1  # one run id throughout
    for site in HONEST:  # the sites' global model is this run's, after both rounds
        applied = json.loads((tmp_path / "sites" / site / "fedavg" / "applied.json").read_text())
        assert applied == {"run": search_run(out), "round": 2}


def search_run(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["run"]


# ------------------------------------------------------------------- Flower processes (launch helper)
def test_flower_node_claiming_another_sites_name_is_not_that_site(probe_federation, signed_probe):
    """An extra SuperNode with a registered key calls itself "north": it is never asked, and nothing it
    could send is filed as north; north's and south's replies come from their bound node ids."""
    federation = probe_federation
    nodes, impostor = federation.nodes, federation.impostor
    assert impostor not in nodes.values() and set(nodes) == {"north", "south"}
    replies = signed_probe["replies"]
    assert {s: r["node_id"] for s, r in replies.items()} == nodes  # each site is its authenticated node
    assert signed_probe["refused"] == []
    assert impostor not in ran(federation)  # its ClientApp never ran: no request reached it
    assert "Receiving" not in (federation.logs / "supernode-impostor.log").read_text()
    bound = json.loads((federation.home / "bindings.json").read_text())
    assert {s: b["node_id"] for s, b in bound.items()} == nodes


def test_flower_send_files_replies_by_source_node_only():
    """FlowerSend's own filter (behind Flower's guarantee that a reply comes from the node the request
    was addressed to), on real Flower messages: requests go to bound nodes only; a reply from a node
    that was not asked, a second reply for one site, an error reply and an unreadable reply are
    refused with one line each; what a reply says about itself (`site`) is ignored."""
    from flwr.app import Error, Message, Metadata, RecordDict

    from medmerge.federated.apps import FlowerSend
    from medmerge.federated.wire import Payload

    def reply(to: Message, src: int, content: Any) -> Message:
        """A reply as the Grid hands it back (metadata as received from the SuperLink)."""
        meta = to.metadata
        got = Metadata(7, f"r{src}", src, 0, meta.message_id, "", time.time(), 60.0, meta.message_type)
        return Message(content, metadata=got)

    class Grid:  # hands back the replies the test makes for the messages FlowerSend pushed, over 2 pulls
        def push_messages(self, messages):
            for m in messages:  # as Flower's Grid does: a message's id is its object id
                m.metadata.__dict__["_message_id"] = m.object_id
            self.asked = [m.metadata.dst_node_id for m in messages]
            claim = Payload("hello", {"site": "south"}).to_record()  # every reply claims to be south
            self.pulls = [
                [
                    reply(messages[0], 11, claim),  # north's node
                    reply(messages[0], 99, claim),  # a node bound to no site
                    reply(messages[0], 11, claim),  # north's node again
                ],
                [],
                [
                    reply(messages[1], 22, Error(0, "x")),  # south's node: an error
                    reply(messages[2], 33, RecordDict()),  # carol's node: unreadable
                ],
                [reply(messages[1], 22, claim)],  # after every request has its reply: never pulled
            ]
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids):  # as the SuperLink: replies to the ids asked for only
            return [m for m in self.pulls.pop(0) if m.metadata.reply_to_message_id in ids]

    from flwr.supercore.task_identity import TaskIdentity

    grid, saved = Grid(), (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1  # as in a ServerApp process
    try:
        send = FlowerSend(grid, 5, {"north": 11, "south": 22, "carol": 33})
        replies = send(Payload("hello"), ["north", "south", "carol", "dave"])
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    assert grid.asked == [11, 22, 33]  # dave is bound to no node: not asked
    assert len(grid.pulls) == 1  # pulled until every request had a reply, then no more
    assert list(replies) == ["north", "carol"] and replies["north"].meta == {"site": "south"}
    assert replies["carol"].kind == "invalid"  # unreadable: filed under carol's node, dropped by Exchange
    assert send.refused == [
        "site dave has no bound node id: not asked",
        "a reply from a node bound to no site asked (node 99) refused",
        "a second reply for north (node 11) refused",
        "site south (node 22): Flower error 0",
    ]


def test_flower_sites_reach_only_the_fleet_api(probe_federation):
    """With --host 0.0.0.0, a site holding the CA file cannot register a key, list nodes or start a
    run at the address it dials; the SuperLink itself listens on loopback only."""
    import httpx
    import psutil

    from medmerge.federated.tls import make_node_key

    federation = probe_federation
    fleet = f"0.0.0.0:{federation.port}"
    config = federation.home / "config.toml"
    if "[superlink.fleet]" not in config.read_text():  # a connection to the address the sites dial
        ca = federation.creds["ca"]
        fleet_connection = f'\n[superlink.fleet]\naddress = "{fleet}"\nroot-certificates = "{ca}"\n'
        config.write_text(config.read_text() + fleet_connection)
    _, public = make_node_key(federation.out / "outsider", "outsider")
    attempts = {
        "register": ["supernode", "register", str(public), "fleet"],
        "list": ["supernode", "list", "fleet"],
        "run": ["run", str(PROBE_APP), "fleet"],
    }
    for what, args in attempts.items():
        argv = ["flwr", *args]
        done = subprocess.run(argv, env=federation.env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "404" in done.stdout + done.stderr, what
    for path in ("/v1/control/list-nodes", "/v1/control/start-run", "/v1/runtime/acquire-task"):
        answer = httpx.post(f"https://{fleet}{path}", content=b"", verify=str(federation.creds["ca"]))
        assert answer.status_code == 404, path
    listed = json.loads(federation._flwr("supernode", "list", "local", "--format", "json"))["nodes"]
    assert {int(n["node-id"]) for n in listed} <= {*federation.nodes.values(), federation.impostor}
    sockets = psutil.Process(federation.procs["superlink"].pid).net_connections()
    listening = {c.laddr.ip for c in sockets if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}


def test_flower_unsigned_app_is_refused(probe_federation, signed_probe):
    """SuperNodes started with --trusted-entities run the app signed by the publisher's key, and refuse
    (Flower's INVALID_FAB error reply; the ClientApp never runs) an unsigned app and one signed by
    another key."""
    from flwr.common.constant import ErrorCode

    from medmerge.federated.registry import build_fab, sign_fab
    from medmerge.federated.tls import make_publisher_key

    federation = probe_federation
    assert set(signed_probe["replies"]) == {"north", "south"}  # the signed app ran
    before = ran(federation)
    unsigned = run_probe(federation, str(PROBE_APP))  # `flwr run ./app`: a local FAB, no verifications
    other = make_publisher_key(federation.out / "other")
    app = federation.out / "probe-app"  # the same app as version 1.0.1, signed by another key
    app.mkdir(exist_ok=True)
    (app / "probe.py").write_bytes((PROBE_APP / "probe.py").read_bytes())
    toml = (PROBE_APP / "pyproject.toml").read_text().replace('version = "1.0.0"', 'version = "1.0.1"')
    (app / "pyproject.toml").write_text(toml)
    fab = build_fab(app, federation.env)
    foreign = run_probe(federation, federation.registry.publish(fab, [sign_fab(fab, *other)]))
    for result in (unsigned, foreign):
        assert result["replies"] == {}
        assert sorted(result["refused"]) == sorted(
            f"site {s} (node {n}): Flower error {ErrorCode.INVALID_FAB}" for s, n in federation.nodes.items()
        )
    assert ran(federation) == before  # no ClientApp ran for either
    log = (federation.logs / "supernode-north.log").read_text()
    assert "App verification is not supported by the connected SuperLink" in log  # unsigned
    assert "FAB verification failed" in log  # signed by a key it does not trust


def _complete_trials(storage) -> dict[int, tuple[str, float]]:
    """trial id → (params, value) of every finished trial in the coordinator's Optuna SQLite storage."""
    with sqlite3.connect(f"file:{storage}?mode=ro", uri=True, timeout=30) as db:
        rows = db.execute(
            "SELECT t.trial_id, v.value FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id "
            "WHERE t.state = 'COMPLETE'"
        ).fetchall()
        params = db.execute("SELECT trial_id, param_name, param_value FROM trial_params").fetchall()
    return {t: (json.dumps(sorted((n, p) for i, n, p in params if i == t)), v) for t, v in rows}


@pytest.mark.slow
def test_flower_coordinator_killed_then_resumed(tmp_path, tiny_llama):
    """kill -9 of the ServerApp mid-search: `medmerge federate` says so in one line within a minute;
    `--resume` finishes the study on the same folder, reusing every trial finished before the kill."""
    trials = 6
    config = study(tmp_path, tiny_llama, trials=trials)
    out, killed = tmp_path / "fed", {}
    storage = out / "coordinator" / "search.db"

    def kill_mid_search(federation: LocalFederation) -> None:
        if "at" not in killed and storage.is_file():
            done = _complete_trials(storage)
            if 1 <= len(done) < trials:
                killed["pid"], killed["at"], killed["done"] = federation.kill_coordinator(), time.time(), done

    with LocalFederation(config, out) as federation:
        nodes = dict(federation.nodes)
        with pytest.raises(MedmergeError) as failure:
            federation.run(timeout=600, on_poll=kill_mid_search)
        noticed = time.time() - killed["at"]
    message = str(failure.value)
    print(f"coordinator killed (pid {killed['pid']}); noticed after {noticed:.1f}s: {message}")
    assert noticed < 60 and "\n" not in message and f"pid {killed['pid']}) is gone" in message
    assert "--resume" in message
    before = _complete_trials(storage)
    assert before.items() >= killed["done"].items() and len(before) < trials
    with LocalFederation(config, out, resume=True) as federation:
        assert federation.nodes == nodes  # same keys, same node bindings
        verdict = json.loads(federation.run(timeout=600).read_text())["verdict"]
    after = _complete_trials(storage)
    assert after.items() >= before.items()  # every trial finished before the kill, kept as it was
    assert len(after) == trials  # and only the missing ones were run
    assert verdict["chosen_merge"] == "task_arithmetic" and not verdict["dropped_sites"]


# ---------------------------------------------------------------- poisoning (the coordinator's screen)
POISON_HONEST = ("north", "south")
X1000, NAN_ADAPTER, FOREIGN, GRAM = "north-5", "south-5", "north-6", "south-6"
POISON_METHODS = ["task_arithmetic", "regmean"]


def _tensors(reply: Payload, name: str, change) -> Payload:
    """`reply` with the safetensors blob `name` replaced by change({tensor name: tensor})."""
    from safetensors.torch import load, save

    return _with_blobs(reply, {name: save(change(load(reply.blobs[name])))})


def _x1000(request: Payload, reply: Payload) -> Payload:
    """Its expert adapter and its FedAvg updates, ΔW ×1000."""
    if request.kind not in ("train", "fedavg") or not reply.blobs:
        return reply
    return _tensors(
        reply,
        "adapter_model.safetensors",
        lambda t: {k: v * 1000 if ".lora_B." in k else v for k, v in t.items()},
    )


def _nan(request: Payload, reply: Payload) -> Payload:
    def poison(tensors: dict) -> dict:
        key = sorted(k for k in tensors if ".lora_B." in k)[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
        return tensors

    return _tensors(reply, "adapter_model.safetensors", poison) if request.kind == "train" else reply


def _foreign(request: Payload, reply: Payload) -> Payload:
    """A LoRA config of its own: lora_alpha ×1000 (ΔW ×1000 without touching a tensor) and an
    alpha_pattern regex that would hang a coordinator that compiled it against a long module name."""
    if request.kind != "train":
        return reply
    config = json.loads(reply.blobs["adapter_config.json"])
    config |= {"lora_alpha": config["lora_alpha"] * 1000, "alpha_pattern": {"(a+)+$": 8000}}
    return _with_blobs(reply, {"adapter_config.json": json.dumps(config).encode()})


def _inflated_gram(request: Payload, reply: Payload) -> Payload:
    """Its Grams ×1000 (a RegMean merge then leans on its adapter), the record made consistent with the
    tensor file again (size, SHA-256) and its declared tokens left as they were."""
    import hashlib

    if request.kind != "train":
        return reply
    reply = _tensors(
        reply,
        "statistics.safetensors",
        lambda t: {k: v * 1000 if k.startswith("gram") else v for k, v in t.items()},
    )
    data = reply.blobs["statistics.safetensors"]
    record = json.loads(reply.blobs["statistics.json"]) | {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return _with_blobs(reply, {"statistics.json": json.dumps(record).encode()})


def _poison_run(root: Path, base: Path, sites: tuple, tamper: dict) -> dict:
    fedavg = {"rounds": 1, "local_steps": 1, "aggregate": "median"}
    config = study(root, base, sites, trials=2, share_statistics=True, fedavg=fedavg)
    data = config.model_dump(mode="json") | {"methods": POISON_METHODS}
    config = FederatedConfig.model_validate(data)
    out, printed = root / "coordinator", io.StringIO()
    send = LocalSend(config, root / "sites", tamper)
    with contextlib.redirect_stdout(printed):
        verdict_path = run_study(config.for_party(None), out, Exchange(send, list(sites), 2))
    searches = {m: json.loads((out / "search" / f"{m}.json").read_text()) for m in POISON_METHODS}
    verdict = json.loads(verdict_path.read_text())["verdict"]
    return {"root": root, "out": out, "verdict": verdict, "printed": printed.getvalue(), "searches": searches}


@pytest.fixture(scope="module")
def poisoned_study(tmp_path_factory, tiny_llama):
    """The same three expert sites twice, with statistics shared (RegMean searched) and a FedAvg round
    (coordinate-wise median): honest, and with north-5 sending its adapter and its FedAvg update ×1000
    while three more sites send a NaN adapter, a foreign LoRA config and Grams ×1000."""
    honest_sites = (*POISON_HONEST, X1000)
    honest = _poison_run(tmp_path_factory.mktemp("honest"), tiny_llama, honest_sites, {})
    tamper = {X1000: _x1000, NAN_ADAPTER: _nan, FOREIGN: _foreign, GRAM: _inflated_gram}
    sites = (*honest_sites, NAN_ADAPTER, FOREIGN, GRAM)
    poisoned = _poison_run(tmp_path_factory.mktemp("poisoned"), tiny_llama, sites, tamper)
    return {"honest": honest, "poisoned": poisoned}


def _refused(result: dict, site: str) -> str:
    """The reason `site` was refused at train: dropped with one printed line, named in the verdict's
    contributions screened and its report; its adapter neither kept nor forwarded to any site."""
    verdict, out = result["verdict"], result["out"]
    drop = verdict["dropped"][site]
    assert drop["step"] == "train"
    lines = [line for line in result["printed"].splitlines() if f"site {site} dropped" in line]
    assert lines == [f"medmerge federate: site {site} dropped at train: {drop['reason']}"]
    assert verdict["contributions_screened"]["train"]["refused"][site] == drop["reason"]
    assert f"- {site}, at train: refused — {drop['reason']}" in (out / "report.md").read_text()
    assert not (out / "experts" / site).exists() and site not in verdict["sites"]
    for peer in (*POISON_HONEST, X1000):
        order = json.loads((result["root"] / "sites" / peer / "peers" / "order.json").read_text())["order"]
        assert order == [*POISON_HONEST, X1000]  # what every site merges and scores
    for search in result["searches"].values():
        assert search["best"]["recipe"]["experts"] == [*POISON_HONEST, X1000]
    return drop["reason"]


def _merge_unaffected(poisoned_study: dict, tolerance: float = 0.002) -> None:
    """Each method's chosen merge scores (validation, the same three scoring sites) within `tolerance`
    nats/token of the honest study's. (On the tiny random model the screened study lands 2e-4 away;
    without the screen the ×1000 adapter, kept as sent, moved it by 0.018.)"""
    for method in POISON_METHODS:
        honest = poisoned_study["honest"]["searches"][method]["best"]["loss"]
        poisoned = poisoned_study["poisoned"]["searches"][method]["best"]["loss"]
        assert abs(poisoned - honest) < tolerance, (method, honest, poisoned)


def test_a_x1000_adapter_is_scaled_back_and_the_merge_holds(poisoned_study):
    from medmerge.federated.checks import lora_study, validate_adapter
    from medmerge.federated.robust import K_NORM, module_norms

    result = poisoned_study["poisoned"]
    verdict, out = result["verdict"], result["out"]
    assert X1000 not in verdict["dropped_sites"] and X1000 in verdict["sites"]
    bounded = verdict["contributions_screened"]["train"]["bounded"]
    assert set(bounded) == {X1000} and bounded[X1000].startswith("ΔW scaled by ")
    assert X1000 in (out / "report.md").read_text().split("Contributions screened")[1]
    assert f"medmerge federate: site {X1000} screened at train: ΔW scaled by" in result["printed"]
    record = json.loads((out / "screened.json").read_text())["train"]
    assert 0.5e-3 < record["rescaled"][X1000] < 2e-3  # back by about the ×1000
    # the adapter kept and forwarded is the screened one: every module within K_NORM × the median
    config = FederatedConfig.model_validate(
        json.loads((result["root"] / "sites" / "north" / "config.yaml").read_text())
    )
    base = Path(config.base_model)
    lora = lora_study(config.train.lora, base, config.base_model)
    kept = {}
    for site in (*POISON_HONEST, X1000):
        folder = result["root"] / "sites" / "north" / "peers" / site
        files = [(folder / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")]
        kept[site] = validate_adapter(site, *files, lora)
    norms = module_norms(kept)
    for module, norm in norms[X1000].items():
        others = sorted(norms[s][module] for s in POISON_HONEST)
        assert norm <= K_NORM * max(others) + 1e-9, module
    _merge_unaffected(poisoned_study)
    # its FedAvg update too: scaled back before the round's median, and named
    (round0,) = verdict["fedavg"]["rounds"]
    assert round0["rule"] == "median" and set(round0["weights"]) == {*POISON_HONEST, X1000}
    assert round0["screened"][X1000].startswith("ΔW scaled by ")
    fedavg = verdict["contributions_screened"]["fedavg"]["round 0"]
    assert set(fedavg["bounded"]) == {X1000} and not fedavg["refused"]
    fedavg_loss = {
        name: next(r["test_loss"] for r in poisoned_study[name]["verdict"]["table"] if r["model"] == "fedavg")
        for name in ("honest", "poisoned")
    }
    assert abs(fedavg_loss["poisoned"] - fedavg_loss["honest"]) < 0.002, fedavg_loss


def test_a_nan_adapter_is_refused_before_any_merge(poisoned_study):
    reason = _refused(poisoned_study["poisoned"], NAN_ADAPTER)
    assert reason.startswith("adapter refused (adapter_model.safetensors ") and "non-finite values" in reason
    _merge_unaffected(poisoned_study)


def test_a_foreign_lora_config_is_refused_never_compiled(poisoned_study):
    reason = _refused(poisoned_study["poisoned"], FOREIGN)
    assert reason.startswith("adapter refused (adapter_config.json alpha_pattern: {'(a+)+$': 8000}")
    _merge_unaffected(poisoned_study)


def test_an_inflated_gram_is_refused(poisoned_study):
    reason = _refused(poisoned_study["poisoned"], GRAM)
    assert reason.startswith("shared statistics refused (Gram of ") and "× the reference" in reason
    out = poisoned_study["poisoned"]["out"]
    assert not (out / "experts" / GRAM).exists()
    _merge_unaffected(poisoned_study)
