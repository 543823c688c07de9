"""A one-message Flower App for the identity and signature tests (tests/federated/test_attacks.py).

ClientApp: marks that it ran (OUT/ran-<node id>) and answers as the site its node config names, with
its own node id. ServerApp: sends one `query.medmerge` request through medmerge's FlowerSend to the
bound sites (run config nodes="site=NODE_ID …") and writes what came back, and what was refused, to
OUT/probe-<run id>.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medmerge.federated.apps import FlowerSend
from medmerge.federated.wire import Payload

client = ClientApp()
server = ServerApp()


@client.query("medmerge")
def _answer(message: Message, context: Context) -> Message:
    out = Path(str(context.run_config["out"]))
    (out / f"ran-{context.node_id}").write_text(str(context.run_id))
    meta = {"site": str(context.node_config["site"]), "node_id": context.node_id}
    return Message(Payload("hello", meta).to_record(), reply_to=message)


@server.main()
def _main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out"]))
    pairs = (item.split("=") for item in str(context.run_config["nodes"]).split())
    nodes = {site: int(node) for site, node in pairs}
    deadline = time.time() + 60
    while not set(nodes.values()) <= set(grid.get_node_ids()) and time.time() < deadline:
        time.sleep(0.2)
    send = FlowerSend(grid, 60, nodes)
    replies = send(Payload("hello"), sorted(nodes))
    result = {"replies": {s: p.meta for s, p in replies.items()}, "refused": send.refused}
    (out / f"probe-{context.run_id}.json").write_text(json.dumps(result))
