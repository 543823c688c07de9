"""`medmerge federate`: a whole federation on one machine, started as a real deployment is
(docs/federated.md#security): separate processes, TLS with a CA made here, SuperNode authentication.

    flower-superlink      on 127.0.0.1 only: its Control and Runtime APIs never face the sites
    fleet gateway         on --host: the Fleet API only (federated/gateway.py); sites dial it
    app registry          a thread here, on 127.0.0.1: the signed app (federated/registry.py)
    flower-supernode × K  each with its registered key and --trusted-entities (the publisher's key)
    site worker × K       each site's resident worker (federated/worker.py), bounded by memory slots

Each site's public key is registered with `flwr supernode register`, and the node id Flower answers is
the site's identity: the coordinator's config carries it (`sites[].node_id`), and replies are filed by
authenticated node id only (apps.FlowerSend). The app is built with `flwr build`, signed with the
consortium's ed25519 key and started as a remote app (`flwr run @medmerge/medmerge-federated==1.0.0`).
Every process is stopped on exit, whatever happened. A coordinator (ServerApp) that dies or stops
beating is noticed within `STALE_S` seconds; `resume` restarts the federation on the same folder.

    out/coordinator/   what the coordinator wrote (verdict, merges, search, status.json)
    out/logs/          every process's log
    out/sites/<site>/  each site's own folder (its config, expert, peers)
    out/slots/         memory slots (federated/slots.py)
    out/.flwr/         credentials (mode 0600, folder 0700), node bindings, Flower home
"""

from __future__ import annotations

import contextlib
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

STALE_S = 45.0  # a coordinator whose heartbeat is older than this is gone (it beats every 5 s)
START_S = 300.0  # how long the coordinator may take to write its first status
TASK_POLL_S = 0.25  # how often a SuperExec asks its SuperNode for a message to run (Flower: 1 s; env wins)


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


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
        resume: bool = False,
    ):
        if insecure and not is_loopback(host):
            raise MedmergeError(
                f"federation: plaintext (--insecure) is allowed on loopback addresses only, and {host!r} "
                "is not; drop --insecure (TLS and SuperNode authentication)"
            )
        self.host, self.resume = host, resume
        self.config, self.out, self.insecure, self.wire_log = config, Path(out).resolve(), insecure, wire_log
        self.workers, self.sockets = workers, {}
        self.home, self.logs, self.slots = self.out / ".flwr", self.out / "logs", self.out / "slots"
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()  # what the sites dial: the Fleet gateway (the SuperLink when insecure)
        self.link_port = self.port if insecure else free_port()  # the SuperLink, on loopback
        self.site_ports = {s.name: free_port() for s in config.sites}
        self.nodes: dict[str, int] = {}  # site -> the node id Flower authenticated for its key
        self.registry: Any = None
        bindir = str(Path(sys.executable).parent)
        self.env = (
            {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(TASK_POLL_S)}
            | os.environ
            | {
                "FLWR_HOME": str(self.home),
                "PATH": bindir + os.pathsep + os.environ["PATH"],
                "PYTHONUNBUFFERED": "1",
            }
        )

    # ------------------------------------------------------------------------------------- processes
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, cwd=self.out
        )
        return self.procs[name]

    def _flwr(self, *args: str) -> str:
        done = subprocess.run(
            ["flwr", *args], env=self.env, cwd=self.out, capture_output=True, text=True, timeout=120
        )
        with (self.logs / "flwr-cli.log").open("a") as log:
            log.write(f"$ flwr {' '.join(args)}\n{done.stdout}{done.stderr}\n")
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

    def _credentials(self) -> None:
        """The CA, server certificate, node keys and publisher key: made once, reused on resume."""
        from medmerge.federated.tls import make_certificates, make_node_key, make_publisher_key

        tls, keys = self.home / "tls", self.home / "keys"
        if self.resume:
            self.creds = {"ca": tls / "ca.pem", "cert": tls / "server.pem", "key": tls / "server.key"}
            self.keys = {s.name: (keys / f"{s.name}.key", keys / f"{s.name}.pub") for s in self.config.sites}
            self.publisher = (keys / "publisher.key", keys / "publisher.pub")
            missing = [p for p in [*self.creds.values(), *self.publisher] if not p.is_file()]
            missing += [p for pair in self.keys.values() for p in pair if not p.is_file()]
            if missing:
                raise MedmergeError(
                    f"federation --resume: {missing[0]} is missing (is {self.out} a federation?)"
                )
            return
        self.creds = make_certificates(tls, self.host)
        self.keys = {s.name: make_node_key(keys, s.name) for s in self.config.sites}
        self.publisher = make_publisher_key(keys)

    def start(self) -> None:
        from medmerge.federated.registry import AppRegistry, build_fab, sign_fab, trusted_entities, write_app

        if self.resume != (self.home / "keys").is_dir():
            raise MedmergeError(
                f"federation: {self.out} holds a federation already (continue it with --resume, or give a "
                "new --out)"
                if not self.resume
                else f"federation --resume: {self.out} holds no federation to resume"
            )
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._credentials()
        self.trusted = self.home / "trusted-entities.yaml"
        self.trusted.write_text(trusted_entities([self.publisher[1]]))
        for site in self.config.sites if self.workers else []:
            self.start_worker(site.name)  # they load torch while the SuperLink starts
        fab = build_fab(write_app(self.home / "app"), self.env)
        self.registry = AppRegistry().__enter__()
        self.app_spec = self.registry.publish(fab, [sign_fab(fab, *self.publisher)])
        security = ["--insecure"] if self.insecure else [*self.tls_args(), "--enable-supernode-auth"]
        link_host = self.host if self.insecure else "127.0.0.1"
        self._start(
            "superlink",
            [
                "flower-superlink",
                *security,
                "--host",
                link_host,
                "--port",
                str(self.link_port),
                "--disable-runtime-dependency-installation",
                "--database",
                str(self.home / "state.db"),
            ],
            env=self.env | {"FLWR_SUPERGRID_API_URL": self.registry.url},
        )
        _wait_port(self.link_port, self.procs["superlink"], 120, "flower-superlink", link_host)
        if not self.insecure:
            self.start_gateway()
        connection = {"address": f"{link_host}:{self.link_port}"}
        connection |= {"insecure": True} if self.insecure else {"root-certificates": str(self.creds["ca"])}
        lines = ["[superlink]", 'default = "local"', "", "[superlink.local]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in connection.items()]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")
        self.bind_sites()

    def start_gateway(self) -> subprocess.Popen:
        """The Fleet gateway on --host: the only address the sites can reach."""
        argv = [
            sys.executable,
            "-m",
            "medmerge.federated.gateway",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        argv += ["--superlink", f"127.0.0.1:{self.link_port}", *self.tls_args()]
        proc = self._start("gateway", argv)
        _wait_port(self.port, proc, 120, "fleet gateway", self.host)
        return proc

    def bind_sites(self) -> None:
        """Register each site's public key (once; a resumed federation keeps its bindings), start its
        SuperNode and bind the site to the node id Flower gave that key. Plaintext (loopback only):
        no keys, so each site is bound to the node that appears once the launcher started its
        SuperNode, one site at a time."""
        from medmerge.manifest import write_json_atomic

        bindings = self.home / "bindings.json"
        if self.insecure:
            for site in self.config.sites:
                before = self.node_ids()
                self.start_site(site.name)
                self.nodes[site.name] = self._new_node(before, site.name)
        else:
            if self.resume:
                self.nodes = {s: int(b["node_id"]) for s, b in json.loads(bindings.read_text()).items()}
                known = self.node_ids(every=True)
                lost = [s for s, n in self.nodes.items() if n not in known]
                if lost or set(self.nodes) != {s.name for s in self.config.sites}:
                    raise MedmergeError(f"federation --resume: the SuperLink no longer knows sites {lost}")
            for site in self.config.sites:
                if site.name not in self.nodes:
                    public = str(self.keys[site.name][1])
                    answer = self._flwr("supernode", "register", public, "local", "--format", "json")
                    self.nodes[site.name] = int(json.loads(answer)["node-id"])
                else:  # a SuperLink restarted after a crash keeps a node online until it misses 2 heartbeats
                    self._wait_status(site.name, lambda status: status != "online", "offline")
                proc = self.start_site(site.name)
                self._wait_status(site.name, lambda status: status == "online", "online", proc)
        keys = {s: str(self.keys[s][1]) if s in self.keys else None for s in self.nodes}
        write_json_atomic(bindings, {s: {"node_id": n, "public_key": keys[s]} for s, n in self.nodes.items()})

    def _wait_status(self, name: str, ok: Any, what: str, proc: Any = None, timeout: float = 150) -> None:
        """Wait until the SuperLink lists site `name`'s node with a status that satisfies `ok`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            listed = json.loads(self._flwr("supernode", "list", "local", "--format", "json"))["nodes"]
            if ok({int(n["node-id"]): n["status"] for n in listed}.get(self.nodes[name])):
                return
            if proc is not None and proc.poll() is not None:
                raise MedmergeError(f"flower-supernode ({name}) exited (see logs/supernode-{name}.log)")
            time.sleep(1)
        raise MedmergeError(f"federation: {name}'s node is not {what} after {timeout:.0f}s (see logs/)")

    def node_ids(self, every: bool = False) -> set[int]:
        """The node ids the SuperLink lists (`every`: registered ones that are offline too)."""
        listed = json.loads(self._flwr("supernode", "list", "local", "--format", "json"))["nodes"]
        return {int(n["node-id"]) for n in listed if every or n.get("status") == "online"}

    def _new_node(self, before: set[int], name: str, timeout: float = 120) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            new = self.node_ids() - before
            if len(new) == 1:
                return new.pop()
            if len(new) > 1:
                raise MedmergeError(f"federation: two nodes joined while {name}'s SuperNode started")
            time.sleep(0.5)
        raise MedmergeError(f"federation: {name}'s SuperNode did not join in {timeout:.0f}s")

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

    def supernode_argv(self, name: str, node: dict[str, str], key: Path | None) -> list[str]:
        """`flower-supernode` for one site: the Fleet address, TLS, its key, the trusted publisher."""
        security = ["--insecure"] if key is None else ["--root-certificates", str(self.creds["ca"])]
        security += [] if key is None else ["--auth-supernode-private-key", str(key)]
        return [
            "flower-supernode",
            *security,
            "--superlink",
            f"{self.host}:{self.port}",
            "--trusted-entities",
            str(self.trusted),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.site_ports.setdefault(name, free_port())),
            "--node-config",
            " ".join(f"{k}={json.dumps(v)}" for k, v in node.items()),
        ]

    def start_site(self, name: str) -> subprocess.Popen:
        folder = self.site_dir(name)
        node = {"site": name, "config": str(self.site_config(name)), "out": str(folder)}
        if name in self.sockets:
            node["worker"] = self.wait_worker(name)
        node |= {"wire-log": str(folder / "wire")} if self.wire_log else {}
        key = None if self.insecure else self.keys[name][0]
        proc = self._start(f"supernode-{name}", self.supernode_argv(name, node, key))
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
        self._start(f"worker-{name}", [*argv, "--socket", str(sock), "--slots", str(self.slots)])
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
    def coordinator_config(self) -> FederatedConfig:
        """The coordinator's copy: no SPEC, and each site bound to its node id."""
        party = self.config.for_party(None)
        sites = [s.model_copy(update={"node_id": self.nodes[s.name]}) for s in party.sites]
        return party.model_copy(update={"sites": sites})

    def run(self, timeout: float, on_poll: Any = None, progress: bool = False) -> Path:
        """Submit the study (the signed app) with `flwr run`; wait for the coordinator's status; returns
        verdict.json. With `progress`, each step the coordinator starts is printed (stderr) with the
        sites it waits on, and each site that waits for memory."""
        import psutil

        from medmerge.federated import slots
        from medmerge.manifest import write_json_atomic

        coordinator = self.out / "coordinator"
        coordinator.mkdir(parents=True, exist_ok=True)
        config = coordinator / "config.yaml"
        write_json_atomic(config, self.coordinator_config().model_dump(mode="json"))
        peak = self.config.federation.training_memory_gb
        slots.write_budget(self.slots, psutil.virtual_memory().available, peak and int(peak * 2**30))
        resume = "true" if self.resume else "false"
        run_config = f'config="{config}" out="{coordinator}" resume="{resume}"'
        answer = self._flwr("run", self.app_spec, "local", "--run-config", run_config, "--format", "json")
        run_id = int(json.loads(answer)["run-id"])
        started, status_path, shown = time.time(), coordinator / "status.json", None
        while time.time() < started + timeout:
            state = json.loads(status_path.read_text()) if status_path.is_file() else {}
            state = state if state.get("run_id") == run_id else {}
            if progress:
                shown = self._progress(state, started, shown)
            if state.get("state") == "finished":
                return coordinator / "verdict.json"
            if state.get("state") == "failed":
                raise MedmergeError(
                    f"federation: {state.get('error')}" + "".join(f"; {e}" for e in self.site_errors())
                )
            self._check_alive(state, started)
            if on_poll is not None:
                on_poll(self)
            time.sleep(0.5)
        raise MedmergeError(f"federation: no verdict after {timeout:.0f}s (see {self.logs})")

    def _check_alive(self, state: dict[str, Any], started: float) -> None:
        """One line, and out, when the SuperLink or the coordinator (ServerApp) is gone."""
        again = f"continue with: medmerge federate … --out {self.out} --resume"
        if self.procs["superlink"].poll() is not None:
            raise MedmergeError(f"federation: flower-superlink exited (see logs/superlink.log); {again}")
        if not state:
            if time.time() - started > START_S:
                raise MedmergeError(
                    f"federation: the coordinator did not start in {START_S:.0f}s (see logs/)"
                )
            return
        if not _alive(int(state["pid"])):
            raise MedmergeError(
                f"federation: the coordinator (ServerApp, pid {state['pid']}) is gone; {again}"
            )
        if time.time() - float(state["heartbeat"]) > STALE_S:
            silent = time.time() - float(state["heartbeat"])
            raise MedmergeError(f"federation: the coordinator has not beaten for {silent:.0f}s; {again}")

    def _progress(self, state: dict[str, Any], started: float, shown: Any) -> Any:
        from medmerge.federated.slots import waiting

        elapsed = int(time.time() - started)
        waits = waiting(self.slots) if self.slots.is_dir() else {}
        now = (state.get("step"), tuple(sorted(waits.items())))
        if now != shown and (state.get("step") or waits):
            line = f"[federate {elapsed // 60}m{elapsed % 60:02d}s]"
            if state.get("step"):
                line += f" {state['step']} at {', '.join(state.get('sites', []))}"
            line += "".join(f"; {site} waits for memory ({what})" for site, what in waits.items())
            print(line, file=sys.stderr, flush=True)
        return now

    def kill_coordinator(self) -> int:
        """kill -9 the ServerApp process (fault tests); returns its pid."""
        pid = int(json.loads((self.out / "coordinator" / "status.json").read_text())["pid"])
        os.kill(pid, signal.SIGKILL)
        return pid

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
        # SuperNodes first, while the SuperLink still runs: each deactivates its node as it stops
        nodes = [p for name, p in self.procs.items() if name.startswith("supernode")]
        for proc in nodes:
            if proc.poll() is None:
                proc.terminate()
        for proc in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
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
        if self.registry is not None:
            self.registry.__exit__(None, None, None)
            self.registry = None

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
    resume: bool = False,
) -> Path:
    """Run the whole study as a local federation; returns the coordinator's verdict.json. Plaintext
    (`insecure`) is refused unless `host` is a loopback address. Methods the federation leaves out
    are named first, one line each (the coordinator's log says so too). `resume`: continue the
    federation in `out` (same keys and node bindings, site folders kept)."""
    from medmerge.federated.coordinator import left_out_lines

    for line in left_out_lines(config):
        print(line, flush=True)
    with LocalFederation(config, Path(out), insecure=insecure, host=host, resume=resume) as federation:
        return federation.run(timeout, progress=progress)
