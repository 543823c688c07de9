"""Security of the local federation, with real processes (no model, no torch): a SuperNode whose key
the SuperLink never registered is refused; a plaintext (--insecure) SuperNode cannot talk to the TLS
SuperLink; `medmerge federate` refuses plaintext unless every address is loopback."""

from __future__ import annotations

import json
import subprocess

import pytest

pytest.importorskip("flwr")

from medmerge.errors import MedmergeError  # noqa: E402
from medmerge.federated.config import FederatedConfig  # noqa: E402
from medmerge.federated.launcher import LocalFederation, free_port, is_loopback  # noqa: E402
from medmerge.federated.tls import make_node_key  # noqa: E402

CONFIG = FederatedConfig(sites=[{"name": "north"}, {"name": "south"}])


def _outsider(federation: LocalFederation, name: str, security: list[str]) -> tuple[int, str]:
    argv = ["flower-supernode", *security, "--superlink", f"127.0.0.1:{federation.port}"]
    proc = federation._start(
        name, [*argv, "--port", str(free_port()), "--max-retries", "2", "--max-wait-time", "10"]
    )
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    return code, (federation.logs / f"{name}.log").read_text(errors="replace")


def test_unregistered_and_plaintext_supernodes_are_refused(tmp_path):
    with LocalFederation(CONFIG, tmp_path / "fed", workers=False) as federation:
        key, _ = make_node_key(federation.home / "keys", "intruder")  # its public key is never registered
        ca = str(federation.creds["ca"])
        code, log = _outsider(
            federation, "intruder", ["--root-certificates", ca, "--auth-supernode-private-key", str(key)]
        )
        assert code not in (0, None) and "Failed to activate SuperNode" in log
        code, log = _outsider(federation, "plaintext", ["--insecure"])
        assert code not in (0, None) and "Failed to initialize the connection" in log
        nodes = json.loads(federation._flwr("supernode", "list", "local", "--format", "json"))["nodes"]
        assert len(nodes) == 2  # only the two registered sites ever joined


def test_plaintext_only_on_loopback(tmp_path, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("10.1.2.3") and not is_loopback("0.0.0.0")
    for host in ("10.1.2.3", "0.0.0.0"):
        with pytest.raises(
            MedmergeError, match=r"plaintext \(--insecure\) is allowed on loopback addresses only"
        ):
            LocalFederation(CONFIG, tmp_path / "fed", insecure=True, host=host)
    LocalFederation(CONFIG, tmp_path / "fed", insecure=True, host="127.0.0.1")  # allowed
    from medmerge.cli import main

    config = tmp_path / "study.yaml"
    config.write_text(json.dumps(CONFIG.model_dump(mode="json")))
    assert main(["federate", str(config), "--out", str(tmp_path / "o"), "--insecure", "--host", "10.1.2.3"])
    assert "loopback addresses only" in capsys.readouterr().err
