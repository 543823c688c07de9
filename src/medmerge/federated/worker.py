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
import sys
from pathlib import Path

from medmerge.federated.wire import Payload

FAILED = "medmerge site failed:"  # starts the line a failed request leaves in the site's log


def answer(name: str, config_path: str, out: str, request: Payload) -> Payload:
    """The site's reply to one request; a failure is one line (never a traceback of data)."""
    try:
        from medmerge.config import load_config
        from medmerge.federated.config import FederatedConfig
        from medmerge.federated.site import Site

        site = Site(name, load_config(config_path, FederatedConfig), Path(out))
        return site.handle(request)
    except Exception as exc:  # noqa: BLE001
        line = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"  # KeyError() has no text
        print(f"{FAILED} {name} {request.kind}: {line}", file=sys.stderr, flush=True)  # the site's own log
        return Payload("error", {"site": name, "error": line[:200]})


def _read(conn: socket.socket) -> bytes:
    head = _exactly(conn, 8)
    return _exactly(conn, int.from_bytes(head, "big"))


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
    """Answer requests one at a time until killed (SIGTERM)."""
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
