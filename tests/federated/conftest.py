"""The probe federation, started once for the Flower-process security tests (test_security.py,
test_attacks.py): a real SuperLink on loopback behind the Fleet gateway on 0.0.0.0, TLS, SuperNode
authentication, the app registry, two sites (north, south) whose SuperNodes trust the publisher's key,
and an impostor: a third SuperNode whose key the coordinator registered, whose node config calls it
"north". No model and no worker: the app is tests/federated/probe-app (one message)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PROBE_APP = Path(__file__).with_name("probe-app")


def run_probe(federation: Any, app: str, timeout: float = 180) -> dict[str, Any]:
    """Start the probe app (an app spec or a folder) with `flwr run`; its result file, once written."""
    out = federation.out / "probe"
    out.mkdir(exist_ok=True)
    nodes = " ".join(f"{s}={n}" for s, n in federation.nodes.items())
    run_config = f'out="{out}" nodes="{nodes}"'
    answer = federation._flwr("run", app, "local", "--run-config", run_config, "--format", "json")
    run_id = json.loads(answer)["run-id"]
    result, deadline = out / f"probe-{run_id}.json", time.time() + timeout
    while not result.is_file():
        assert time.time() < deadline, f"the probe run {run_id} wrote nothing in {timeout:.0f}s"
        time.sleep(0.3)
    return json.loads(result.read_text()) | {"run_id": run_id}


def ran(federation: Any) -> set[int]:
    """The node ids whose probe ClientApp ran (in any run so far)."""
    return {int(p.name.removeprefix("ran-")) for p in (federation.out / "probe").glob("ran-*")}


@pytest.fixture(scope="session")
def probe_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("flwr")
    from medmerge.federated.config import FederatedConfig
    from medmerge.federated.launcher import LocalFederation, _wait_port
    from medmerge.federated.tls import make_node_key

    config = FederatedConfig(sites=[{"name": "north"}, {"name": "south"}])
    out = tmp_path_factory.mktemp("probe") / "fed"
    with LocalFederation(config, out, workers=False, host="0.0.0.0") as federation:
        key, public = make_node_key(federation.home / "keys", "impostor")
        registered = federation._flwr("supernode", "register", str(public), "local", "--format", "json")
        federation.impostor = int(json.loads(registered)["node-id"])
        proc = federation._start(
            "supernode-impostor", federation.supernode_argv("impostor", {"site": "north"}, key)
        )
        _wait_port(federation.site_ports["impostor"], proc, 120, "flower-supernode (impostor)")
        yield federation


@pytest.fixture(scope="session")
def signed_probe(probe_federation: Any) -> dict[str, Any]:
    """The probe app, built and signed with the publisher's key, run once: what came back."""
    from medmerge.federated.registry import build_fab, sign_fab

    fab = build_fab(PROBE_APP, probe_federation.env)
    spec = probe_federation.registry.publish(fab, [sign_fab(fab, *probe_federation.publisher)])
    return run_probe(probe_federation, spec)
