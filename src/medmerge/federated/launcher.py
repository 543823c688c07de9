"""`medmerge federate`: a whole federation on one machine. One `flower-superlink` and one
`flower-supernode` per site, as separate processes on 127.0.0.1; TLS with a CA made here and SuperNode
authentication (registered public keys) unless `insecure`; the Flower App (medmerge.federated.apps)
submitted with `flwr run`. Every process is stopped on exit, whatever happened.

    out/coordinator/   what the coordinator wrote (verdict, merges, search)
    out/logs/          every process's log
    out/sites/<site>/  each site's own folder (its config, expert, peers)
    out/.flwr/         credentials, Flower home
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.federated.config import FederatedConfig

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
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    import ipaddress

    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str, host: str = "127.0.0.1") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise MedmergeError(f"{what} exited with code {proc.returncode} (see its log)")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise MedmergeError(f"{what}: port {port} not open after {timeout:.0f}s")


class LocalFederation:
    def __init__(
        self,
        config: FederatedConfig,
        out: Path,
        *,
        insecure: bool = False,
        wire_log: bool = False,
        workers: bool = True,
        host: str = "127.0.0.1",
    ):
        if insecure and not is_loopback(host):
            raise MedmergeError(
                f"federation: plaintext (--insecure) is allowed on loopback addresses only, and {host!r} "
                "is not; drop --insecure (TLS and SuperNode authentication)"
            )
        self.host = host
        self.config, self.out, self.insecure, self.wire_log = config, Path(out).resolve(), insecure, wire_log
        self.workers, self.sockets = workers, {}
        self.home, self.logs = self.out / ".flwr", self.out / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.site_ports = {s.name: free_port() for s in config.sites}
        bindir = str(Path(sys.executable).parent)
        self.env = os.environ | {
            "FLWR_HOME": str(self.home),
            "PATH": bindir + os.pathsep + os.environ["PATH"],
        }
        self.env["PYTHONUNBUFFERED"] = "1"

    # ------------------------------------------------------------------------------------- processes
    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.out
        )
        return self.procs[name]

    def _flwr(self, *args: str) -> str:
        done = subprocess.run(
            ["flwr", *args], env=self.env, cwd=self.out, capture_output=True, text=True, timeout=120
        )
        (self.logs / "flwr-cli.log").open("a").write(f"$ flwr {' '.join(args)}\n{done.stdout}{done.stderr}\n")
        if done.returncode != 0:
            raise MedmergeError(
                f"flwr {args[0]} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
            )
        return done.stdout

    def tls_args(self) -> list[str]:
        c = self.creds
        return [
            "--ssl-ca-certfile",
            str(c["ca"]),
            "--ssl-certfile",
            str(c["cert"]),
            "--ssl-keyfile",
            str(c["key"]),
        ]

    def start(self) -> None:
        from medmerge.federated.tls import make_certificates, make_node_key

        self.home.mkdir(parents=True, exist_ok=True)
        self.creds = {} if self.insecure else make_certificates(self.home / "tls", self.host)
        self.keys = (
            {}
            if self.insecure
            else {s.name: make_node_key(self.home / "keys", s.name) for s in self.config.sites}
        )
        security = ["--insecure"] if self.insecure else [*self.tls_args(), "--enable-supernode-auth"]
        for site in self.config.sites if self.workers else []:
            self.start_worker(site.name)  # they load torch while the SuperLink starts
        self._start(
            "superlink",
            [
                "flower-superlink",
                *security,
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                "--database",
                str(self.home / "state.db"),
            ],
        )
        _wait_port(self.port, self.procs["superlink"], 120, "flower-superlink", self.host)
        connection = {"address": f"{self.host}:{self.port}"}
        connection |= {"insecure": True} if self.insecure else {"root-certificates": str(self.creds["ca"])}
        lines = ["[superlink]", 'default = "local"', "", "[superlink.local]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in connection.items()]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")
        for site in self.config.sites:
            if not self.insecure:
                self._flwr("supernode", "register", str(self.keys[site.name][1]), "local")
            self.start_site(site.name)

    def site_dir(self, name: str) -> Path:
        return self.out / "sites" / name

    def site_config(self, name: str) -> Path:
        """The site's own copy of the study (its SPECs only), written once."""
        config = self.site_dir(name) / "config.yaml"
        if not config.is_file():
            from medmerge.manifest import write_json_atomic

            config.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(config, self.config.for_party(name).model_dump(mode="json"))
        return config

    def start_site(self, name: str) -> subprocess.Popen:
        folder = self.site_dir(name)
        node = {"site": name, "config": str(self.site_config(name)), "out": str(folder)}
        if name in self.sockets:
            node["worker"] = self.wait_worker(name)
        node |= {"wire-log": str(folder / "wire")} if self.wire_log else {}
        security = (
            ["--insecure"]
            if self.insecure
            else [
                "--root-certificates",
                str(self.creds["ca"]),
                "--auth-supernode-private-key",
                str(self.keys[name][0]),
            ]
        )
        proc = self._start(
            f"supernode-{name}",
            [
                "flower-supernode",
                *security,
                "--superlink",
                f"{self.host}:{self.port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.site_ports[name]),
                "--node-config",
                " ".join(f"{k}={json.dumps(v)}" for k, v in node.items()),
            ],
        )
        _wait_port(self.site_ports[name], proc, 120, f"flower-supernode ({name})")
        return proc

    def start_worker(self, name: str) -> str:
        """Launch the site's resident worker (federated/worker.py); returns its socket path."""
        sock = self.site_dir(name) / "worker.sock"
        if len(str(sock)) > 100:  # AF_UNIX paths are limited to ~107 bytes
            import tempfile

            sock = Path(tempfile.mkdtemp(prefix="medmerge-")) / f"{name}.sock"
        Path(f"{sock}.ready").unlink(missing_ok=True)
        argv = [sys.executable, "-m", "medmerge.federated.worker", "--site", name]
        argv += ["--config", str(self.site_config(name)), "--out", str(self.site_dir(name))]
        self._start(f"worker-{name}", [*argv, "--socket", str(sock)])
        self.sockets[name] = str(sock)
        return str(sock)

    def wait_worker(self, name: str, timeout: float = 300) -> str:
        sock, proc, deadline = self.sockets[name], self.procs[f"worker-{name}"], time.time() + timeout
        while not Path(f"{sock}.ready").is_file():
            if proc.poll() is not None or time.time() > deadline:
                raise MedmergeError(f"site worker ({name}) did not start (see logs/worker-{name}.log)")
            time.sleep(0.2)
        return sock

    def kill_site(self, name: str) -> None:
        """kill -9 a site's SuperNode (fault tests)."""
        proc = self.procs[f"supernode-{name}"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # ------------------------------------------------------------------------------------------- run
    def run(self, timeout: float, on_poll: Any = None, progress: bool = False) -> Path:
        """Submit the study with `flwr run`; wait for the coordinator's status; returns verdict.json.
        With `progress`, each step the coordinator starts is printed (stderr) with the sites it waits on."""
        coordinator = self.out / "coordinator"
        coordinator.mkdir(parents=True, exist_ok=True)
        config = coordinator / "config.yaml"
        from medmerge.manifest import write_json_atomic

        write_json_atomic(config, self.config.for_party(None).model_dump(mode="json"))
        app = self.home / "app"
        app.mkdir(parents=True, exist_ok=True)
        (app / "pyproject.toml").write_text(APP_TOML)
        run_config = f'config="{config}" out="{coordinator}"'
        self._flwr("run", str(app), "local", "--run-config", run_config, "--format", "json")
        deadline, status, shown, start = time.time() + timeout, coordinator / "status.json", None, time.time()
        while time.time() < deadline:
            state = json.loads(status.read_text()) if status.is_file() else {}
            if progress and state.get("step") not in (None, shown):
                shown, elapsed = state["step"], int(time.time() - start)
                sites = ", ".join(state.get("sites", []))
                print(
                    f"[federate {elapsed // 60}m{elapsed % 60:02d}s] {shown} at {sites}",
                    file=sys.stderr,
                    flush=True,
                )
            if state.get("state") == "finished":
                return coordinator / "verdict.json"
            if state.get("state") == "failed":
                raise MedmergeError(
                    f"federation: {state.get('error')}" + "".join(f"; {e}" for e in self.site_errors())
                )
            if self.procs["superlink"].poll() is not None:
                raise MedmergeError("federation: flower-superlink exited (see logs/superlink.log)")
            if on_poll is not None:
                on_poll(self)
            time.sleep(0.5)
        raise MedmergeError(f"federation: no verdict after {timeout:.0f}s (see {self.logs})")

    def site_errors(self) -> list[str]:
        """The last failure each local site's worker logged (its own log, on this machine), e.g. a dataset
        it cannot find: the coordinator only learns that the site failed."""
        from medmerge.federated.worker import FAILED

        errors = []
        for log in sorted(self.logs.glob("worker-*.log")):
            lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith(FAILED)]
            if lines:
                errors.append(lines[-1].removeprefix(FAILED).strip() + f" (logs/{log.name})")
        return errors

    def stop(self) -> None:
        """SIGTERM every process this federation started (and their children), then SIGKILL stragglers."""
        import psutil

        children = []
        for proc in self.procs.values():
            try:
                children += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def federate(
    config: FederatedConfig,
    out: str | Path,
    *,
    insecure: bool = False,
    timeout: float = 6 * 3600,
    host: str = "127.0.0.1",
    progress: bool = True,
) -> Path:
    """Run the whole study as a local federation; returns the coordinator's verdict.json. Plaintext
    (`insecure`) is refused unless `host` is a loopback address. Methods the federation leaves out
    are named first, one line each (the coordinator's log says so too)."""
    from medmerge.federated.coordinator import left_out_lines

    for line in left_out_lines(config):
        print(line, flush=True)
    with LocalFederation(config, Path(out), insecure=insecure, host=host) as federation:
        return federation.run(timeout, progress=progress)
