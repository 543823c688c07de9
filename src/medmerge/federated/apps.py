"""The Flower App: a ClientApp (`client`) that runs site.py at each SuperNode, and a ServerApp
(`server`) that runs coordinator.py at the SuperLink. All requests are `query.medmerge` messages
whose content is a wire.Payload.

SuperNode node config: site="NAME" config="SITE.yaml" out="DIR" [worker="SOCKET"] [wire-log="DIR"]
(worker: the site's resident worker, federated/worker.py, which keeps torch and the model loaded).
Run config: config="COORDINATOR.yaml" out="DIR" resume="true"|"false" (resume: continue the study
whose search storage is in DIR, see coordinator.run_study).

Identity: a site IS the node id that Flower authenticated for the public key registered for it
(`sites[].node_id` in the coordinator's config; `medmerge federate` writes it from
`flwr supernode register`'s answer). What a node writes about itself (node config, `site` in a
reply) names nothing: requests go to bound node ids only, and each reply is filed under the site bound
to its `metadata.src_node_id`, which the SuperLink fixes to the node that the request was addressed to
(linkstate `store_message_res`: the reply's source must be the request's destination, and a node can
only pull and answer its own requests after SuperNode authentication).

Liveness: the ServerApp writes its pid and a heartbeat (every `HEARTBEAT_S`) into status.json, so that
`medmerge federate` can tell a dead coordinator from a slow one.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medmerge.federated.wire import Payload, record_mod

ACTION = "query.medmerge"
HEARTBEAT_S = 5.0  # how often the ServerApp stamps status.json
POLL_S = 0.25  # how often the ServerApp asks the SuperLink for replies (Flower's Grid: every 3 s)
client = ClientApp(mods=[record_mod(None)])
server = ServerApp()


@client.query("medmerge")
def _site(message: Message, context: Context) -> Message:
    from medmerge.federated.worker import answer, ask

    node = context.node_config
    request = Payload.from_record(message.content)
    worker = str(node.get("worker", ""))
    reply = ask(worker, request) if worker else None  # the site's resident worker, if it runs
    if reply is None:
        reply = answer(str(node["site"]), str(node["config"]), str(node["out"]), request)
    return Message(reply.to_record(), reply_to=message)


def node_bindings(sites: list[Any]) -> dict[str, int]:
    """site name → bound node id, from the coordinator's `sites[]` (each needs its `node_id`)."""
    from medmerge.errors import MedmergeError

    missing = [s.name for s in sites if getattr(s, "node_id", None) is None]
    if missing:
        raise MedmergeError(
            f"coordinator config: sites {missing} have no node_id: bind each site to the node id Flower "
            "gave the public key registered for it (`flwr supernode register KEY.pub` prints it; "
            "docs/federated.md#security)"
        )
    nodes = {s.name: int(s.node_id) for s in sites}
    if len(set(nodes.values())) != len(nodes):
        raise MedmergeError(f"coordinator config: two sites share one node_id ({nodes})")
    return nodes


class FlowerSend:
    """Exchange.send over a Flower Grid, to bound node ids only; a reply is filed under the site bound
    to the node Flower authenticated as its source. A reply from a node that was not asked, a second
    reply for one site or an unreadable reply is refused, with one line (`refused` keeps them)."""

    def __init__(self, grid: Grid, timeout: float, nodes: dict[str, int]) -> None:
        self.grid, self.timeout, self.nodes = grid, timeout, dict(nodes)
        self.refused: list[str] = []

    def _refuse(self, line: str) -> None:
        self.refused.append(line)
        print(f"medmerge coordinator: {line}", file=sys.stderr, flush=True)

    def _send_and_receive(self, messages: list[Message]) -> list[Message]:
        """Grid.send_and_receive, polling every `POLL_S` instead of its fixed 3 s: push the messages, then
        pull until each has a reply or `timeout` has passed (what arrives after that is never read)."""
        waiting = {i for i in self.grid.push_messages(messages) if i}  # None: not pushed, never answered
        end, got = time.monotonic() + self.timeout, []
        while waiting:
            pulled = list(self.grid.pull_messages(waiting))
            got += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if waiting and time.monotonic() >= end:
                break
            time.sleep(POLL_S if waiting else 0)
        return got

    def __call__(self, request: Payload, sites: list[str]) -> dict[str, Payload]:
        return self.each({site: request for site in sites})

    def each(self, requests: dict[str, Payload]) -> dict[str, Payload]:
        """Each site its own request, all pushed at once; {site: reply} as in `__call__`."""
        asked = {self.nodes[s]: s for s in requests if s in self.nodes}
        for site in requests:
            if site not in self.nodes:
                self._refuse(f"site {site} has no bound node id: not asked")
        messages = [
            Message(requests[site].to_record(), dst_node_id=node, message_type=ACTION)
            for node, site in asked.items()
        ]
        replies: dict[str, Payload] = {}
        for reply in self._send_and_receive(messages) if messages else []:
            node = reply.metadata.src_node_id
            site = asked.get(node)
            if site is None or site in replies:
                what = "a second reply for " + site if site else "a reply from a node bound to no site asked"
                self._refuse(f"{what} (node {node}) refused")
                continue
            if reply.has_error():
                self._refuse(f"site {site} (node {node}): Flower error {reply.error.code}")
                continue
            try:
                replies[site] = Payload.from_record(reply.content)
            except (KeyError, TypeError, ValueError) as exc:
                self._refuse(f"site {site} (node {node}): unreadable reply ({type(exc).__name__})")
        return replies


class Status:
    """status.json of the coordinator: its state, pid and run id, and a heartbeat (Unix time) that a
    thread refreshes every `HEARTBEAT_S` seconds until `close`."""

    def __init__(self, out: Path, run_id: int) -> None:
        self.path, self.lock, self.done = out / "status.json", threading.Lock(), threading.Event()
        self.base = {"pid": os.getpid(), "run_id": run_id, "started": time.time()}
        self.state: dict[str, Any] = {"state": "running"}
        self.write()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="status-heartbeat")
        self.thread.start()

    def write(self, **state: Any) -> None:
        from medmerge.manifest import write_json_atomic

        with self.lock:
            self.state = state or self.state
            write_json_atomic(self.path, {**self.base, **self.state, "heartbeat": time.time()})

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            self.write()

    def close(self, **state: Any) -> None:
        self.done.set()
        self.thread.join()
        self.write(**state)


@server.main()
def _coordinator(grid: Grid, context: Context) -> None:
    from medmerge.config import load_config
    from medmerge.federated.config import FederatedConfig
    from medmerge.federated.coordinator import Exchange, run_study
    from medmerge.threads import use_threads

    out = Path(str(context.run_config["out"]))
    out.mkdir(parents=True, exist_ok=True)
    status = Status(out, context.run_id)
    try:
        config = load_config(str(context.run_config["config"]), FederatedConfig)
        use_threads(config.threads)
        nodes = node_bindings(config.sites)
        deadline = time.time() + config.federation.reply_timeout_s
        while not set(nodes.values()) <= set(grid.get_node_ids()) and time.time() < deadline:
            time.sleep(0.5)
        send = FlowerSend(grid, config.federation.reply_timeout_s, nodes)
        exchange = Exchange(
            send,
            [s.name for s in config.sites],
            config.federation.min_sites,
            evaluators=config.evaluators,
            reply_timeout_s=config.federation.reply_timeout_s,
            on_step=lambda step, sites: status.write(state="running", step=step, sites=sites),
        )
        resume = str(context.run_config.get("resume", "false")).lower() == "true"
        verdict = run_study(config, out, exchange, **({"resume": True} if resume else {}))
        status.close(state="finished", verdict=str(verdict), dropped=exchange.drops, refused=send.refused)
    except Exception as exc:  # noqa: BLE001
        status.close(state="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        print(json.dumps({"medmerge": "failed", "trace": traceback.format_exc()[-2000:]}))
        raise
