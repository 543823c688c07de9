"""Security of the local federation. With real processes (the probe federation of conftest.py, no
model): a SuperNode whose key the SuperLink never registered is refused; a plaintext (--insecure)
SuperNode cannot talk to the TLS SuperLink. Without: `medmerge federate` refuses plaintext unless
every address is loopback; private keys are created with mode 0600 (never readable by others, even for
a moment, even under umask 0); a federation folder is never silently reused."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

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


def test_unregistered_and_plaintext_supernodes_are_refused(probe_federation):
    federation = probe_federation
    key, _ = make_node_key(federation.out / "intruder", "intruder")  # its public key is never registered
    ca = str(federation.creds["ca"])
    code, log = _outsider(
        federation, "intruder", ["--root-certificates", ca, "--auth-supernode-private-key", str(key)]
    )
    assert code not in (0, None) and "Failed to activate SuperNode" in log
    code, log = _outsider(federation, "plaintext", ["--insecure"])
    assert code not in (0, None) and "Failed to initialize the connection" in log
    nodes = json.loads(federation._flwr("supernode", "list", "local", "--format", "json"))["nodes"]
    # only the registered keys ever joined: the two sites and the impostor of conftest.py
    assert {int(n["node-id"]) for n in nodes} == {*federation.nodes.values(), federation.impostor}


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


KEYS_UNDER_UMASK_0 = """
import os, stat, sys
from pathlib import Path
folder = Path(sys.argv[1])
open_paths, exposed = [], []

def audit(event, args):
    # at every file event, no file this process created under `folder` may be readable by others
    path = os.fsdecode(args[0]) if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) else ""
    if path.startswith(str(folder)):
        open_paths.append(path)
    if event in ("open", "os.chmod", "os.link", "os.rename", "os.replace", "os.remove"):
        for path in open_paths:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                continue
            if mode & 0o077:
                exposed.append((path, oct(mode), event))

sys.addaudithook(audit)
os.umask(0)
from medmerge.federated.tls import make_certificates, make_node_key, make_publisher_key
make_certificates(folder / "tls")
make_node_key(folder / "keys", "north")
make_publisher_key(folder / "keys")
print(exposed)
"""


def test_keys_are_0600_from_creation(tmp_path):
    """Under umask 0, every credential file is mode 0600 at every file event from its creation on (an
    audit hook stats it at each open/chmod/link/rename), and ends 0600 in a 0700 folder."""
    done = subprocess.run(
        [sys.executable, "-c", KEYS_UNDER_UMASK_0, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # never readable by group or others, not even for a moment
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {
        "ca.pem", "server.pem", "server.key", "north.key", "north.pub", "publisher.key", "publisher.pub"
    }  # fmt: skip
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in (tmp_path / "tls", tmp_path / "keys"))
    with pytest.raises(FileExistsError):  # an existing key is never overwritten
        make_node_key(tmp_path / "keys", "north")


def test_a_federation_folder_is_not_reused_without_resume(tmp_path):
    (tmp_path / "fed" / ".flwr" / "keys").mkdir(parents=True)
    with pytest.raises(MedmergeError, match="holds a federation already"):
        LocalFederation(CONFIG, tmp_path / "fed", workers=False).start()
    with pytest.raises(MedmergeError, match="holds no federation to resume"):
        LocalFederation(CONFIG, tmp_path / "new", workers=False, resume=True).start()
