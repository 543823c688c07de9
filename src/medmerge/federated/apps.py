"""The Flower App: a ClientApp (`client`) that runs site.py at each SuperNode, and a ServerApp
(`server`) that runs coordinator.py at the SuperLink. All requests are `query.medmerge` messages
whose content is a wire.Payload.

SuperNode node config: site="NAME" config="SITE.yaml" out="DIR" [worker="SOCKET"] [wire-log="DIR"]
(worker: the site's resident worker, federated/worker.py, which keeps torch and the model loaded).
Run config: config="COORDINATOR.yaml" out="DIR".
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medmerge.federated.wire import Payload, record_mod

ACTION = "query.medmerge"
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


class FlowerSend:
    """Exchange.send over a Flower Grid: site names ↔ node ids learned from the first replies."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self.grid, self.timeout, self.nodes = grid, timeout, {}

    def __call__(self, request: Payload, sites: list[str]) -> dict[str, Payload]:
        # the first request (hello) goes to every node; its replies name the sites
        targets = (
            [self.nodes[s] for s in sites if s in self.nodes]
            if self.nodes
            else list(self.grid.get_node_ids())
        )
        messages = [Message(request.to_record(), dst_node_id=n, message_type=ACTION) for n in targets]
        replies = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                continue
            payload = Payload.from_record(reply.content)
            site = payload.meta.get("site")
            self.nodes.setdefault(site, reply.metadata.src_node_id)
            replies[site] = payload
        return replies


def _status(out: Path, **state: Any) -> None:
    from medmerge.manifest import write_json_atomic

    write_json_atomic(out / "status.json", state)


@server.main()
def _coordinator(grid: Grid, context: Context) -> None:
    from medmerge.config import load_config
    from medmerge.federated.config import FederatedConfig
    from medmerge.federated.coordinator import Exchange, run_study
    from medmerge.threads import use_threads

    out = Path(str(context.run_config["out"]))
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    _status(out, state="running", started=started)
    try:
        config = load_config(str(context.run_config["config"]), FederatedConfig)
        use_threads(config.threads)
        wanted, deadline = len(config.sites), time.time() + config.federation.reply_timeout_s
        while len(list(grid.get_node_ids())) < wanted and time.time() < deadline:
            time.sleep(0.5)
        send = FlowerSend(grid, config.federation.reply_timeout_s)
        exchange = Exchange(
            send,
            [s.name for s in config.sites],
            config.federation.min_sites,
            evaluators=config.evaluators,
            reply_timeout_s=config.federation.reply_timeout_s,
            on_step=lambda step, sites: _status(
                out, state="running", started=started, step=step, sites=sites
            ),
        )
        verdict = run_study(config, out, exchange)
        _status(out, state="finished", verdict=str(verdict), dropped=exchange.drops)
    except Exception as exc:  # noqa: BLE001
        _status(out, state="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        print(json.dumps({"medmerge": "failed", "trace": traceback.format_exc()[-2000:]}))
        raise
