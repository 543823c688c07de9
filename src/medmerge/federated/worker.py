"""A site's resident worker: one long-lived process per site that answers the site's requests.

Flower 1.42 starts a fresh ClientApp process for every message (`--isolation subprocess`, and with
`--isolation process` too: `flwr-clientapp` runs one token, i.e. one message; a long-lived ClientApp
is flwrlabs/flower#3670, still open). Each of those processes would import torch + transformers
(~10–20 s on a busy 2-core machine) and reload the base model. So the ClientApp stays thin (flwr and
medmerge.federated.wire only) and hands the request to this worker over a Unix socket in the site's
own folder (mode 0600; nothing leaves the machine); the worker keeps torch, the base model and the
tokenizer loaded. Without a worker (`worker` absent from the node config, or not running) the
ClientApp answers in its own process, as before.

    python -m medmerge.federated.worker --site NAME --config SITE.yaml --out DIR --socket PATH [--slots DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from pathlib import Path
from typing import Any

from medmerge.federated.wire import FAILED, MESSAGE_BYTES, META_BYTES, Payload, log_failure

__all__ = ["FAILED", "answer", "ask", "serve", "site_of"]
_SITES: dict[tuple[str, str, str], Any] = {}  # (name, config, out) -> its Site, kept across requests


def site_of(name: str, config_path: str, out: str) -> Any:
    """The site's `Site`, built once per process from its own config copy (resident model, tokenizer
    and validation batches then stay loaded across requests)."""
    key = (name, config_path, out)
    if key not in _SITES:
        from medmerge.config import load_config
        from medmerge.federated import secure_site  # noqa: F401 (registers the secure-sum site steps)
        from medmerge.federated.config import FederatedConfig
        from medmerge.federated.site import Site

        _SITES[key] = Site(name, load_config(config_path, FederatedConfig), Path(out))
    return _SITES[key]


def answer(name: str, config_path: str, out: str, request: Payload) -> Payload:
    """The site's reply to one request (medmerge.federated.protocol.answer); a site that cannot even be
    set up (its config) answers error code `failed`, the reason in its own log only."""
    from medmerge.federated import protocol

    try:
        site = site_of(name, config_path, out)
    except Exception as exc:  # noqa: BLE001
        log_failure(name, request.kind, "failed", exc)
        return protocol.ErrorReply(site=name, error=type(exc).__name__, code="failed").payload()
    return protocol.answer(site, request)


def _read(conn: socket.socket) -> bytes:
    size = int.from_bytes(_exactly(conn, 8), "big")
    if size > MESSAGE_BYTES + META_BYTES:
        raise ValueError(f"a {size}-byte frame")
    return _exactly(conn, size)


def _exactly(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("worker socket closed mid-frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _write(conn: socket.socket, data: bytes) -> None:
    conn.sendall(len(data).to_bytes(8, "big") + data)


def ask(path: str, request: Payload) -> Payload | None:
    """The worker's reply, or None when no worker listens at `path` (the caller answers itself)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        _write(conn, request.to_bytes())
        return Payload.from_bytes(_read(conn))


def serve(name: str, config_path: str, out: str, path: str) -> None:
    """Answer requests one at a time until killed (SIGTERM), with one `Site` for all of them."""
    import peft  # noqa: F401  (imported once here, not per message)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is the site operator's alone
    try:
        server.bind(path)
    finally:
        os.umask(old)
    server.listen(4)
    Path(path + ".ready").write_text(str(os.getpid()))
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                request = Payload.from_bytes(_read(conn))
            except (ConnectionError, ValueError):
                continue
            _write(conn, answer(name, config_path, out, request).to_bytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medmerge.federated.worker", description=__doc__)
    for option in ("--site", "--config", "--out", "--socket"):
        parser.add_argument(option, required=True)
    parser.add_argument("--slots", help="memory-slot folder shared by the local sites (federated/slots.py)")
    args = parser.parse_args(argv)
    from medmerge.federated.slots import configure

    configure(args.slots, args.site)
    serve(args.site, args.config, args.out, args.socket)


if __name__ == "__main__":
    main()
