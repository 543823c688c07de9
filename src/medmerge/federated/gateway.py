"""The Fleet gateway: the only door of the coordinator's host that sites can reach.

Flower 1.42's SuperLink serves its Control API (register a SuperNode, start or stop a run), its Runtime
API (the ServerApp's own channel: acquire its task, send and pull messages) and its Fleet API (what
SuperNodes call) from ONE HTTP server on `--host:--port` (flwr/superlink/cli/flower_superlink.py,
`_run_superlink_http_api`, l. 492-532; flwr/superlink/main.py l. 219-221 mounts the three routers on one
FastAPI app). `--control-api-address` is deprecated and only used by a legacy gRPC server
(`FLWR_INTERNAL_GRPC_CONTROL_API`, l. 140) while the HTTP Control routes stay on the shared port; and
the Control API's account authentication (OIDC, `FLWR_OIDC_ENABLED=1`) exists only in Flower's
enterprise package: flwr/superlink/config_loader.py l. 181-192 exits with "OIDC account authentication
is unavailable in this Flower distribution". Without it the Control API authenticates no one
(`NoOpControlAuthnPlugin`), and TLS there authenticates only the server. So with
`flower-superlink --host 0.0.0.0`, anyone who can open a connection can register a key, start a run,
or take the ServerApp's pending task.

So the SuperLink listens on loopback only, and this gateway listens on the sites' address, with the
SuperLink's TLS certificate, and forwards exactly the Fleet API (`POST /v1/fleet/<call>`) to it,
streaming both ways; every other request is answered 404 before it reaches Flower. SuperNode
authentication is untouched: each Fleet request carries its node's signed headers, checked by the
SuperLink (flwr/superlink/routers/fleet/node_auth.py).

    python -m medmerge.federated.gateway --host 0.0.0.0 --port 9092 --superlink 127.0.0.1:9093 \\
        --ssl-certfile server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.pem
"""

from __future__ import annotations

import argparse
import contextlib
import re
import ssl
from collections.abc import AsyncIterator
from typing import Any

FLEET = re.compile(r"/v1/fleet/[a-z-]+")  # the Fleet router's calls (flwr/superlink/routers/fleet/router.py)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }  # fmt: skip
)


def create_app(superlink: str, ca: str | None) -> Any:
    """The ASGI app: Fleet calls forwarded to `https://SUPERLINK` (verified against `ca`; plaintext
    when `ca` is None), everything else 404."""
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    verify: Any = ssl.create_default_context(cafile=ca) if ca else False
    scheme = "https" if ca else "http"
    client = httpx.AsyncClient(base_url=f"{scheme}://{superlink}", verify=verify, timeout=None)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not FLEET.fullmatch(path) or request.url.query:
            return PlainTextResponse("not found: this address serves the Fleet API only\n", status_code=404)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        upstream = await client.send(
            client.build_request("POST", path, headers=headers, content=request.stream()), stream=True
        )
        back = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            upstream.aiter_raw(), status_code=upstream.status_code, headers=back,
            background=BackgroundTask(upstream.aclose),
        )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medmerge.federated.gateway", description=__doc__)
    parser.add_argument("--host", required=True, help="address the sites dial")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--superlink", required=True, help="the SuperLink's loopback address, HOST:PORT")
    parser.add_argument("--ssl-certfile", help="the SuperLink's server certificate (PEM)")
    parser.add_argument("--ssl-keyfile", help="its private key")
    parser.add_argument("--ssl-ca-certfile", help="the CA that signed it (to verify the SuperLink)")
    parser.add_argument("--insecure", action="store_true", help="plaintext on both sides (loopback tests)")
    args = parser.parse_args(argv)
    tls = (args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
    if not args.insecure and not all(tls):
        parser.error("give --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile (or --insecure)")
    import uvicorn

    uvicorn.run(
        create_app(args.superlink, None if args.insecure else args.ssl_ca_certfile),
        host=args.host,
        port=args.port,
        ssl_certfile=None if args.insecure else args.ssl_certfile,
        ssl_keyfile=None if args.insecure else args.ssl_keyfile,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
