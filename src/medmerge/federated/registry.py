"""Signed apps: the consortium signs the Flower App (FAB) at build time; every SuperNode runs only
apps signed by a key it trusts (`flower-supernode --trusted-entities`).

How Flower 1.42 checks an app (flwr/supernode/start_client_internal.py): a SuperNode started with
trusted entities refuses (an `INVALID_FAB` error reply, l. 71) any FAB whose `verifications` lack
`valid_license` (l. 345) or carry no signature of a trusted key over
`create_message_to_sign(sha256(fab), signed_at)` (`_verify_fab`, l. 606;
flwr/supercore/primitives/asymmetric_ed25519.py l. 154: 8-byte big-endian `signed_at` + digest,
ed25519, base64url). A SuperLink attaches `verifications` to a FAB only when it fetches the app from a
Flower Hub (flwr/superlink/servicer/control/control_handlers.py: `start_run` l. 685 and `add_app`
l. 1764 call `_get_remote_fab`, l. 2272, which POSTs `{FLWR_SUPERGRID_API_URL}/hub/fetch-fab` and sets
`valid_license` whenever the hub returned verifications, `_format_verification` l. 2252). A local app
(`flwr run ./app`) always runs with none: the CLI sends `Fab(fab_hash, fab_bytes, {})`
(flwr/cli/run/run.py l. 187) and `start_run` keeps `verification_dict = {}` (l. 636) for a provided FAB
(l. 691). So a self-signed app has no path in Flower 1.42 but the Hub's protocol, and the Hub's
address is the `FLWR_SUPERGRID_API_URL` environment variable (flwr/supercore/constant.py l. 63).

This module is that path, with nothing of Flower's checking replaced: `sign_fab` signs in Flower's own
format with the publisher's key (held by the consortium, never by the registry), and `AppRegistry`
serves the signed FABs on the Hub's two endpoints (POST /hub/fetch-fab → {fab_url, verifications};
GET the FAB) on a loopback address of the coordinator's host; the SuperLink is started with
`FLWR_SUPERGRID_API_URL` pointing at it and the study is started as a remote app
(`flwr run @medmerge/medmerge-federated==1.0.0`). The registry cannot make an app run: only a
signature by a trusted key does, checked at each site. (`valid_license` is a flag the SuperLink sets,
not a check: the signature is the check.)

    python -m medmerge.federated.registry sign [APP_DIR] --key publisher --out SIGNED/   (the publisher)
    python -m medmerge.federated.registry trust publisher.pub > trusted.yaml            (each site)
    python -m medmerge.federated.registry serve SIGNED/ --port 9080                     (the coordinator)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError

SIGNATURE_SUFFIX = ".sig.json"  # beside APP.fab: the list of its verification records
# medmerge's Flower App: its whole code is the installed medmerge (the FAB holds this file only)
APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "medmerge-federated"
version = "1.0.0"
description = "medmerge federated study"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "medmerge"

[tool.flwr.app.components]
serverapp = "medmerge.federated.apps:server"
clientapp = "medmerge.federated.apps:client"

[tool.flwr.app.config]
config = ""
out = ""
resume = "false"
"""


def write_app(folder: Path) -> Path:
    """medmerge's app folder (pyproject.toml naming medmerge.federated.apps), ready for `flwr build`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_TOML)
    return folder


def key_id(public_key: Path) -> str:
    """The trusted-entity id of an OpenSSH ed25519 public key: `fpk_` + the first 32 hex digits of
    SHA-256 over its raw 32 bytes (any stable string works: ids only pair signatures with keys)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(public_key.read_bytes())
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:32]


def trusted_entities(public_keys: list[Path]) -> str:
    """The YAML `flower-supernode --trusted-entities` reads: {key id: 'ssh-ed25519 AAAA…'}."""
    entries = {key_id(p): p.read_text().strip() for p in public_keys}
    return json.dumps(entries, indent=1) + "\n"  # JSON is YAML


def sign_fab(fab: bytes, private_key: Path, public_key: Path, signed_at: int | None = None) -> dict[str, Any]:
    """One verification record for `fab`, in Flower's format: the ed25519 signature (base64url, no
    padding) of `create_message_to_sign(sha256(fab), signed_at)` (signed_at: Unix seconds)."""
    from flwr.supercore.primitives.asymmetric_ed25519 import (
        create_message_to_sign,
        load_private_key,
        sign_message,
    )

    signed_at = int(time.time()) if signed_at is None else signed_at
    message = create_message_to_sign(hashlib.sha256(fab).digest(), signed_at)
    signature = sign_message(load_private_key(private_key), message)
    return {
        "public_key_id": key_id(public_key),
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        "signed_at": signed_at,
    }


def build_fab(app: Path, env: dict[str, str] | None = None) -> bytes:
    """The FAB `flwr build --app APP` makes (Flower's own bundler: its include/exclude rules)."""
    flwr = Path(sys.executable).with_name("flwr")  # the flwr of this environment, else the PATH's
    with tempfile.TemporaryDirectory(prefix="medmerge-fab-") as cwd:
        done = subprocess.run(
            [str(flwr) if flwr.is_file() else "flwr", "build", "--app", str(app)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        fabs = list(Path(cwd).glob("*.fab"))
        if done.returncode != 0 or len(fabs) != 1:
            raise MedmergeError(
                f"flwr build --app {app} failed: {(done.stderr or done.stdout).strip()[-300:]}"
            )
        return fabs[0].read_bytes()


def app_spec(fab: bytes) -> str:
    """`@publisher/name==version` of a FAB, read from its pyproject.toml as the SuperLink reads it."""
    from flwr.common.config import get_fab_config, get_metadata_from_config

    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    return f"@{fab_id}=={version}"


@dataclass(frozen=True)
class _App:
    fab: bytes
    verifications: list[dict[str, Any]]


class AppRegistry:
    """The Hub's fetch endpoints for the apps published here, on 127.0.0.1 (a thread)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.apps: dict[str, _App] = {}
        self.by_hash: dict[str, bytes] = {}
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, code: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.rstrip("/").endswith("/hub/fetch-fab"):
                    try:
                        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                        spec = f"{body['app_id']}=={body['app_version']}"
                    except (ValueError, KeyError, TypeError):
                        return self._reply(400, b'{"detail": "bad request"}')
                    app = registry.apps.get(spec)
                    if app is None:
                        return self._reply(404, json.dumps({"detail": f"{spec} not published"}).encode())
                    digest = hashlib.sha256(app.fab).hexdigest()
                    answer: dict[str, Any] = {"fab_url": f"{registry.url}/fab/{digest}"}
                    if app.verifications:
                        answer["verifications"] = app.verifications
                    return self._reply(200, json.dumps(answer).encode())
                return self._reply(404, b'{"detail": "not found"}')

            def do_GET(self) -> None:  # noqa: N802
                digest = self.path.rsplit("/", 1)[-1]
                fab = registry.by_hash.get(digest) if self.path.startswith("/fab/") else None
                if fab is None:
                    return self._reply(404, b'{"detail": "not found"}')
                return self._reply(200, fab, "application/octet-stream")

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="app-registry")

    def publish(self, fab: bytes, verifications: list[dict[str, Any]]) -> str:
        """Serve `fab` with these verification records (none: an unsigned app); returns its app spec."""
        spec = app_spec(fab)
        self.apps[spec] = _App(fab, list(verifications))
        self.by_hash[hashlib.sha256(fab).hexdigest()] = fab
        return spec

    def __enter__(self) -> AppRegistry:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def _sign_command(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="medmerge-app-") as tmp:
        fab = build_fab(Path(args.app) if args.app else write_app(Path(tmp) / "medmerge-app"))
    public = Path(args.public or f"{args.key}.pub")
    if not public.is_file():
        raise MedmergeError(f"{public}: no public key beside {args.key} (give --public)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = app_spec(fab).lstrip("@").replace("/", "_").replace("==", "-")
    (out / f"{name}.fab").write_bytes(fab)
    record = sign_fab(fab, Path(args.key), public)
    (out / f"{name}.fab{SIGNATURE_SUFFIX}").write_text(json.dumps([record], indent=1) + "\n")
    print(f"{out / name}.fab: {app_spec(fab)} signed by {record['public_key_id']}")


def _serve_command(args: argparse.Namespace) -> None:
    registry = AppRegistry(args.host, args.port)
    for fab_path in sorted(Path(args.folder).glob("*.fab")):
        signatures = fab_path.with_name(fab_path.name + SIGNATURE_SUFFIX)
        records = json.loads(signatures.read_text()) if signatures.is_file() else []
        print(f"{registry.publish(fab_path.read_bytes(), records)} ({len(records)} signature(s))", flush=True)
    print(f"app registry on {registry.url} (FLWR_SUPERGRID_API_URL for the SuperLink)", flush=True)
    with registry:
        registry.thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medmerge.federated.registry", description=__doc__)
    sub = parser.add_subparsers(required=True)
    sign = sub.add_parser("sign", help="build APP_DIR with `flwr build` and sign the FAB")
    sign.add_argument("app", metavar="APP_DIR", nargs="?", help="default: medmerge's own app")
    sign.add_argument("--key", required=True, help="the publisher's OpenSSH ed25519 private key")
    sign.add_argument("--public", help="its public key (default: KEY.pub)")
    sign.add_argument("--out", required=True, help="folder for APP.fab and APP.fab.sig.json")
    sign.set_defaults(handler=_sign_command)
    trust = sub.add_parser("trust", help="print the --trusted-entities YAML for these public keys")
    trust.add_argument("public", nargs="+", metavar="KEY.pub")
    trust.set_defaults(handler=lambda args: print(trusted_entities([Path(p) for p in args.public]), end=""))
    serve = sub.add_parser("serve", help="serve the signed FABs of FOLDER as the SuperLink's app hub")
    serve.add_argument("folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=9080)
    serve.set_defaults(handler=_serve_command)
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except MedmergeError as exc:
        raise SystemExit(f"medmerge registry: error: {exc}") from None


if __name__ == "__main__":
    main()
