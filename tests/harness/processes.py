"""Process harness for Flower's Deployment Engine (flwr 1.41).

Starts a ``flower-superlink`` (TLS + SuperNode authentication), registers
SuperNode public keys, starts ``flower-supernode`` processes (each with its own
``--node-config``), writes ``$FLWR_HOME/config.toml`` for a SuperLink
connection, runs ``flwr run <app> <connection> --stream`` and stops every
process it started (terminate, then kill, whole process group plus any
descendants seen) when the context manager exits, also on failure.

Facts about flwr 1.41 this harness relies on (checked against the installed
source):

* ``flower-superlink`` serves Fleet, Control and Runtime ("ServerAppIo") APIs
  over ONE HTTP(S) port (uvicorn), set with ``--host`` / ``--port`` (defaults
  127.0.0.1:8000). ``--fleet-api-address`` / ``--control-api-address`` are
  deprecated, ``--serverappio-api-address`` is rejected.
* ``flower-supernode`` also serves a local Runtime HTTP API (default port 9094)
  for its ClientApp processes, so several SuperNodes on one host need distinct
  ``--port`` values. ``--clientappio-api-address`` no longer exists.
* Node auth: SuperLink ``--enable-supernode-auth`` (requires TLS); SuperNode
  ``--auth-supernode-private-key`` (OpenSSH ECDSA key; the public key is
  derived); keys are registered with ``flwr supernode register KEY.pub CONN``.
* ``flwr`` reads SuperLink connections only from ``$FLWR_HOME/config.toml``
  (``[superlink.<name>] address/root-certificates/insecure``). A legacy
  ``[tool.flwr.federations]`` in pyproject.toml is *migrated* into that file
  by ``flwr`` (it rewrites files), so don't rely on it.

Usage::

    from tests.harness.processes import FlowerDeployment

    with FlowerDeployment(workdir, n_nodes=3) as dep:    # makes certs
        dep.start_superlink()
        dep.write_flwr_config()
        for i in range(3):
            dep.register_node(i)
            dep.start_supernode(i, node_config={"partition-id": i,
                                                "partition-dir": f"/data/p{i}",
                                                "device": "cpu"})
        dep.wait_nodes_online(3)
        result = dep.run_app(app_dir, run_config={"num-rounds": 2})
        assert result.status == "finished:completed"
    # every process is gone here
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DeploymentError",
    "FlowerDeployment",
    "ManagedProcess",
    "RunResult",
    "descendant_pids",
    "format_config",
    "free_port",
    "pid_alive",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
MAKE_CERTS_SH = REPO_ROOT / "scripts" / "make_certs.sh"
LOOPBACK = "127.0.0.1"


class DeploymentError(RuntimeError):
    """Raised when a Flower process fails to start or a command fails."""


# --------------------------------------------------------------------------- utils
def free_port(host: str = LOOPBACK) -> int:
    """Return a currently free TCP port on ``host`` (bind to port 0).

    There is an unavoidable race between closing the probe socket and the
    Flower process binding the port; ``_reserved`` below avoids handing the
    same port out twice within one process.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _reserved:
            _reserved.add(port)
            return port


_reserved: set[int] = set()


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (non-Linux): trust os.kill


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8")
            out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def descendant_pids(pid: int) -> set[int]:
    """All live descendants of ``pid`` (Linux /proc; empty set elsewhere)."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppid_map().items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        text = str(value)
        if '"' in text or "\\" in text or "\n" in text:
            raise ValueError(f"config value not representable for flwr: {text!r}")
        return f'"{text}"'
    raise TypeError(f"unsupported config value type {type(value)!r}")


def format_config(config: Mapping[str, Any] | str | None) -> str:
    """Format a dict as Flower's ``key=value`` config string.

    ``{"partition-dir": "/p", "device": "cuda:0", "id": 3}`` ->
    ``partition-dir="/p" device="cuda:0" id=3`` (what ``--node-config`` and
    ``--run-config`` expect: TOML values separated by spaces).
    """
    if config is None:
        return ""
    if isinstance(config, str):
        return config
    return " ".join(f"{key}={_toml_value(val)}" for key, val in config.items())


# --------------------------------------------------------------------------- process
@dataclass
class ManagedProcess:
    """A process started by the harness (own session / process group)."""

    name: str
    cmd: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log_fh: IO[bytes] | None = field(default=None, repr=False)
    seen_descendants: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout=timeout)

    def wait_for_log(self, needle: str, timeout: float) -> bool:
        """Wait until ``needle`` appears in the log (False on timeout/exit)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            if not self.alive():
                return needle in self.log_text()
            time.sleep(0.1)
        return False

    def snapshot_descendants(self) -> set[int]:
        """Remember current descendants so they can be reaped later."""
        if self.alive():
            self.seen_descendants |= descendant_pids(self.pid)
        return set(self.seen_descendants)

    def all_pids(self) -> set[int]:
        return {self.pid} | self.seen_descendants

    def signal(self, sig: int = signal.SIGTERM, group: bool = True) -> None:
        """Send ``sig`` to the process (and its process group)."""
        self.snapshot_descendants()
        if group:
            try:
                os.killpg(self.pid, sig)  # pid == pgid (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.popen.send_signal(sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate, wait ``timeout``, then SIGKILL group and descendants."""
        self.snapshot_descendants()
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left (process, its group, or descendants that moved to
        # their own session such as the SuperLink's SuperExec) gets SIGKILL.
        self.snapshot_descendants()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.all_pids():
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        if self._log_fh is not None and not self._log_fh.closed:
            self._log_fh.close()


@dataclass
class RunResult:
    """Outcome of ``flwr run``."""

    run_id: int | None
    returncode: int
    status: str | None  # e.g. "finished:completed", "finished:failed"
    output: str
    seconds: float


# --------------------------------------------------------------------------- harness
class FlowerDeployment:
    """Start and tear down a local Flower deployment (SuperLink + SuperNodes).

    Parameters
    ----------
    workdir : directory for certs (``certs/``), logs (``logs/``) and the
        ``FLWR_HOME`` directories (``flwr-home/{cli,superlink,supernode-i}``).
    n_nodes : number of SuperNode key pairs to create with make_certs.sh.
    tls : serve the SuperLink over HTTPS (required for node auth).
    node_auth : pass ``--enable-supernode-auth`` to the SuperLink.
    connection : name of the SuperLink connection written to config.toml.
    certs_dir : use existing certs instead of ``workdir/certs``.
    env : extra environment for all processes.
    stop_timeout : seconds between SIGTERM and SIGKILL on teardown.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        workdir: str | os.PathLike[str],
        *,
        n_nodes: int = 2,
        tls: bool = True,
        node_auth: bool = True,
        connection: str = "fedmeta",
        certs_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 5.0,
        superexec_poll_interval: float | None = 0.2,
    ) -> None:
        if node_auth and not tls:
            raise ValueError("SuperNode authentication requires TLS in flwr 1.41")
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.home_root = self.workdir / "flwr-home"
        self.cli_home = self.home_root / "cli"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        self.certs_dir = Path(certs_dir).resolve() if certs_dir else self.workdir / "certs"
        self.n_nodes = n_nodes
        self.tls = tls
        self.node_auth = node_auth
        self.connection = connection
        self.stop_timeout = stop_timeout
        self.host = LOOPBACK
        self.port: int | None = None
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self.processes: list[ManagedProcess] = []
        self.node_ids: dict[str, int] = {}  # key name -> registered node id
        self._counter = 0
        self.env = dict(os.environ)
        # Offline machines: never let Flower `uv sync` app dependencies.
        self.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        self.env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if superexec_poll_interval is not None:
            # SuperExec polls for new ClientApp/ServerApp tasks (default 1 s).
            self.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(superexec_poll_interval)
        if env:
            self.env.update(env)
        if tls and not (self.certs_dir / "ca.crt").exists():
            self.make_certs(n_nodes)

    # ------------------------------------------------------------ context manager
    def __enter__(self) -> FlowerDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # ------------------------------------------------------------ paths
    @property
    def address(self) -> str:
        if self.port is None:
            raise DeploymentError("SuperLink not started")
        return f"{self.host}:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.certs_dir / "ca.crt"

    def node_key(self, index: int) -> Path:
        return self.certs_dir / f"supernode-{index}" / "node.key"

    def node_pubkey(self, index: int) -> Path:
        return self.certs_dir / f"supernode-{index}" / "node.key.pub"

    # ------------------------------------------------------------ certificates
    def make_certs(self, n_nodes: int | None = None) -> Path:
        """Run scripts/make_certs.sh into ``certs_dir`` (idempotent)."""
        n_nodes = self.n_nodes if n_nodes is None else n_nodes
        self._check(
            ["bash", str(MAKE_CERTS_SH), str(self.certs_dir), str(n_nodes)],
            "make_certs",
            timeout=120,
        )
        return self.certs_dir

    # ------------------------------------------------------------ process plumbing
    def _spawn(
        self, name: str, cmd: list[str], flwr_home: Path | None = None
    ) -> ManagedProcess:
        self._counter += 1
        log_path = self.log_dir / f"{self._counter:02d}-{name}.log"
        env = dict(self.env)
        if flwr_home is not None:
            flwr_home.mkdir(parents=True, exist_ok=True)
            env["FLWR_HOME"] = str(flwr_home)
        log_fh = open(log_path, "wb")  # pylint: disable=consider-using-with
        log_fh.write(("$ " + shlex.join(cmd) + "\n").encode())
        log_fh.flush()
        popen = subprocess.Popen(  # pylint: disable=consider-using-with
            cmd,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(self.workdir),
            start_new_session=True,  # own process group -> killpg works
        )
        proc = ManagedProcess(name, cmd, popen, log_path, log_fh)
        self.processes.append(proc)
        return proc

    def _check(
        self,
        cmd: list[str],
        name: str,
        timeout: float = 60,
        flwr_home: Path | None = None,
    ) -> str:
        """Run a short command to completion (tracked like every process)."""
        proc = self._spawn(name, cmd, flwr_home=flwr_home)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.stop(self.stop_timeout)
            raise DeploymentError(
                f"{name} timed out after {timeout}s\n{proc.log_text()[-4000:]}"
            ) from None
        proc.stop(self.stop_timeout)  # reap leftovers, close log
        out = proc.log_text()
        if proc.returncode != 0:
            raise DeploymentError(f"{name} failed (rc={proc.returncode}):\n{out[-4000:]}")
        return out

    def _flwr(self, args: list[str], name: str, timeout: float = 60) -> str:
        return self._check(["flwr", *args], name, timeout=timeout, flwr_home=self.cli_home)

    @staticmethod
    def _json_from(output: str) -> Any:
        start = output.find("\n{")
        start = start + 1 if start >= 0 else output.find("{")
        if start < 0:
            raise DeploymentError(f"no JSON in output:\n{output[-2000:]}")
        return json.loads(output[start : output.rfind("}") + 1])

    # ------------------------------------------------------------ SuperLink
    def start_superlink(
        self,
        *,
        port: int | None = None,
        extra_args: Iterable[str] = (),
        timeout: float = 30.0,
    ) -> ManagedProcess:
        """Start ``flower-superlink`` on 127.0.0.1:<free port> and wait for it."""
        if self.superlink is not None and self.superlink.alive():
            raise DeploymentError("SuperLink already running")
        self.port = port or free_port()
        cmd = [
            "flower-superlink",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.tls:
            cmd += [
                "--ssl-ca-certfile",
                str(self.ca_cert),
                "--ssl-certfile",
                str(self.certs_dir / "server.crt"),
                "--ssl-keyfile",
                str(self.certs_dir / "server.key"),
            ]
        else:
            cmd.append("--insecure")
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        cmd += list(extra_args)
        proc = self._spawn("superlink", cmd, flwr_home=self.home_root / "superlink")
        self.superlink = proc
        self._wait_port(proc, timeout)
        if not proc.wait_for_log("Uvicorn running", timeout):
            raise DeploymentError(f"SuperLink did not start:\n{proc.log_text()[-4000:]}")
        return proc

    def _wait_port(self, proc: ManagedProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise DeploymentError(
                    f"{proc.name} exited (rc={proc.returncode}):\n{proc.log_text()[-4000:]}"
                )
            try:
                with socket.create_connection((self.host, cast_int(self.port)), 0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise DeploymentError(f"{proc.name} port {self.port} not open after {timeout}s")

    # ------------------------------------------------------------ flwr CLI config
    def write_flwr_config(self, flwr_home: str | os.PathLike[str] | None = None) -> Path:
        """Write ``$FLWR_HOME/config.toml`` with connection ``self.connection``."""
        home = Path(flwr_home) if flwr_home else self.cli_home
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{self.connection}"',
            "",
            f"[superlink.{self.connection}]",
            f'address = "{self.address}"',
        ]
        if self.tls:
            lines.append(f'root-certificates = "{self.ca_cert}"')
        else:
            lines.append("insecure = true")
        path = home / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------ node registration
    def register_node(self, key: int | str | os.PathLike[str]) -> int:
        """Register a SuperNode public key; returns the SuperNode's node ID.

        ``key`` is a node index (``certs/supernode-<i>/node.key.pub``) or a
        path to an OpenSSH EC public key.
        """
        pub = self.node_pubkey(key) if isinstance(key, int) else Path(key)
        out = self._flwr(
            ["supernode", "register", str(pub), self.connection, "--format", "json"],
            f"register-{pub.parent.name}",
        )
        data = self._json_from(out)
        if not data.get("success"):
            raise DeploymentError(f"register {pub} failed: {data}")
        node_id = int(data["node-id"])
        self.node_ids[str(pub)] = node_id
        return node_id

    def register_nodes(self, keys: Iterable[int | str | os.PathLike[str]]) -> list[int]:
        """Register several public keys concurrently; returns node IDs in order."""
        pubs = [self.node_pubkey(k) if isinstance(k, int) else Path(k) for k in keys]
        procs = [
            self._spawn(
                f"register-{pub.parent.name}",
                ["flwr", "supernode", "register", str(pub), self.connection, "--format", "json"],
                flwr_home=self.cli_home,
            )
            for pub in pubs
        ]
        ids: list[int] = []
        for pub, proc in zip(pubs, procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            proc.stop(self.stop_timeout)
            data = self._json_from(proc.log_text())
            if proc.returncode != 0 or not data.get("success"):
                raise DeploymentError(f"register {pub} failed: {proc.log_text()[-2000:]}")
            self.node_ids[str(pub)] = int(data["node-id"])
            ids.append(int(data["node-id"]))
        return ids

    def list_nodes(self) -> list[dict[str, Any]]:
        out = self._flwr(["supernode", "ls", self.connection, "--format", "json"], "supernode-ls")
        return list(self._json_from(out).get("nodes", []))

    def wait_nodes_online(self, n: int, timeout: float = 60.0) -> list[int]:
        """Wait until at least ``n`` SuperNodes are ``online``; return their IDs."""
        deadline = time.monotonic() + timeout
        online: list[int] = []
        while time.monotonic() < deadline:
            online = [int(x["node-id"]) for x in self.list_nodes() if x["status"] == "online"]
            if len(online) >= n:
                return online
            time.sleep(0.5)
        raise DeploymentError(f"only {len(online)}/{n} SuperNodes online after {timeout}s")

    # ------------------------------------------------------------ SuperNodes
    def start_supernode(  # pylint: disable=too-many-arguments
        self,
        index: int,
        *,
        node_config: Mapping[str, Any] | str | None = None,
        name: str | None = None,
        private_key: str | os.PathLike[str] | None | bool = True,
        root_certificates: str | os.PathLike[str] | None | bool = True,
        insecure: bool = False,
        max_retries: int | None = None,
        max_wait_time: float | None = None,
        extra_args: Iterable[str] = (),
    ) -> ManagedProcess:
        """Start ``flower-supernode`` number ``index``.

        ``private_key=True`` uses ``certs/supernode-<index>/node.key``; a path
        uses that key; ``False``/``None`` starts without node auth.
        ``root_certificates=True`` uses the CA cert; ``False``/``None`` omits
        ``--root-certificates`` (falls back to system CAs -> fails against our
        self-signed CA). ``insecure=True`` passes ``--insecure`` (plain HTTP).
        """
        name = name or f"supernode-{index}"
        cmd = [
            "flower-supernode",
            "--superlink",
            self.address,
            "--host",
            self.host,
            "--port",
            str(free_port()),  # local Runtime API for its ClientApps
        ]
        if insecure:
            cmd.append("--insecure")
        elif root_certificates:
            ca = self.ca_cert if root_certificates is True else Path(root_certificates)
            cmd += ["--root-certificates", str(ca)]
        if private_key:
            key = self.node_key(index) if private_key is True else Path(private_key)
            cmd += ["--auth-supernode-private-key", str(key)]
        cfg = format_config(node_config)
        if cfg:
            cmd += ["--node-config", cfg]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        if max_wait_time is not None:
            cmd += ["--max-wait-time", str(max_wait_time)]
        cmd += list(extra_args)
        # One FLWR_HOME per SuperNode (as on separate hosts): FABs are
        # installed there by every ClientApp process.
        proc = self._spawn(name, cmd, flwr_home=self.home_root / name)
        self.supernodes[name] = proc
        return proc

    def kill_supernode(self, name: str | int, sig: int = signal.SIGKILL) -> int:
        """Kill a SuperNode (whole process group: SuperExec + ClientApps).

        Returns the SuperNode PID. SIGKILL simulates a crash; SIGTERM a
        graceful shutdown.
        """
        proc = self.supernodes[name if isinstance(name, str) else f"supernode-{name}"]
        proc.signal(sig, group=True)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.signal(signal.SIGKILL, group=True)
            proc.wait(timeout=self.stop_timeout)
        return proc.pid

    # ------------------------------------------------------------ runs
    def start_run(
        self,
        app_dir: str | os.PathLike[str],
        *,
        run_config: Mapping[str, Any] | str | None = None,
        stream: bool = True,
    ) -> ManagedProcess:
        """Start ``flwr run <app_dir> <connection> [--stream]`` (non-blocking)."""
        cmd = ["flwr", "run", str(Path(app_dir).resolve()), self.connection]
        cfg = format_config(run_config)
        if cfg:
            cmd += ["--run-config", cfg]
        if stream:
            cmd.append("--stream")
        return self._spawn("flwr-run", cmd, flwr_home=self.cli_home)

    @staticmethod
    def run_id_from(proc: ManagedProcess) -> int | None:
        for line in proc.log_text().splitlines():
            if "Successfully started run" in line:
                return int(line.split("Successfully started run", 1)[1].split()[0])
        return None

    def run_status(self, run_id: int) -> str | None:
        out = self._flwr(
            ["ls", self.connection, "--run-id", str(run_id), "--format", "json"], "flwr-ls"
        )
        runs = self._json_from(out).get("runs", [])
        return runs[0]["status"] if runs else None

    def wait_run(
        self, proc: ManagedProcess, timeout: float = 300.0, poll: float = 1.0
    ) -> RunResult:
        """Wait for a run started by :meth:`start_run` to reach ``finished:*``.

        ``flwr run --stream`` returns when all logs of the finished run are
        streamed; without ``--stream`` it returns right after submission and
        the run is polled with ``flwr ls --run-id``.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        while proc.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.alive():
            proc.stop(self.stop_timeout)
            raise DeploymentError(f"flwr run did not finish in {timeout}s:\n{proc.log_text()[-4000:]}")
        run_id = self.run_id_from(proc)
        status = None
        if run_id is not None:
            while time.monotonic() < deadline:
                status = self.run_status(run_id)
                if status and status.startswith("finished"):
                    break
                time.sleep(poll)
        proc.stop(self.stop_timeout)
        return RunResult(
            run_id=run_id,
            returncode=cast_int(proc.returncode),
            status=status,
            output=proc.log_text(),
            seconds=time.monotonic() - t0,
        )

    def run_app(
        self,
        app_dir: str | os.PathLike[str],
        *,
        run_config: Mapping[str, Any] | str | None = None,
        timeout: float = 300.0,
    ) -> RunResult:
        """``flwr run <app_dir> <connection> --stream`` and wait for the end."""
        return self.wait_run(self.start_run(app_dir, run_config=run_config), timeout)

    # ------------------------------------------------------------ teardown
    def all_pids(self) -> set[int]:
        pids: set[int] = set()
        for proc in self.processes:
            pids |= proc.all_pids()
        return pids

    def live_pids(self) -> set[int]:
        return {pid for pid in self.all_pids() if pid_alive(pid)}

    def stop_all(self) -> None:
        """Stop every process started (SuperNodes first, SuperLink last)."""
        for proc in self.processes:
            proc.snapshot_descendants()
        for proc in reversed(self.processes):
            if proc is not self.superlink:
                proc.stop(self.stop_timeout)
        if self.superlink is not None:
            self.superlink.stop(self.stop_timeout)
        # Final sweep: anything still alive gets SIGKILL.
        deadline = time.monotonic() + self.stop_timeout
        while (left := self.live_pids()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.1)

    def dump_logs(self, stream: IO[str] = sys.stderr, tail: int = 3000) -> None:
        """Print the tail of every log (handy in a test's failure path)."""
        for proc in self.processes:
            stream.write(f"\n===== {proc.name} (pid {proc.pid}) {proc.log_path}\n")
            stream.write(proc.log_text()[-tail:])


def cast_int(value: int | None) -> int:
    if value is None:
        raise DeploymentError("unexpected None")
    return int(value)


def kill_after_rounds(cmd: list[str], out, rounds: int, timeout: float = 120) -> None:
    """Start ``cmd`` (a run writing into ``out``), SIGKILL it once ``out/metrics.jsonl`` has ``rounds`` rows (or after
    ``timeout`` seconds), and wait for it: a crash in the middle of a run, as a power cut would make it."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    metrics = Path(out) / "metrics.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= rounds):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
