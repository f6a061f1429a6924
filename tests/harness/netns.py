"""A Flower federation across Linux network namespaces (root + iproute2).

:class:`VirtualNetwork` builds a throw-away virtual LAN: one network namespace
per "host" (SuperLink, operator, each SuperNode), each with ``lo`` up and one
interface ``eth0`` holding its own address on a private /24, all joined by a
Linux bridge. The bridge and the host ends of the veth pairs live in a
namespace of their own, so **nothing is created in the root namespace** (no
interface, no address, no route); the only global objects are the named
namespaces themselves (``/run/netns/<name>``). No namespace has a default
route, so nothing started inside can reach any address outside the /24::

    ns <base>-bridge:  br0 ── v0 ── v1 ── v2 ...        (bridge + veth ends)
                              │     │     │
    ns <base>-superlink:     eth0 10.231.0.1/24, lo
    ns <base>-operator:            eth0 10.231.0.2/24, lo   (flwr CLI)
    ns <base>-node0:                     eth0 10.231.0.11/24, lo
    ...

Names are ``fm<pid>x<random>-<role>`` so parallel runs never collide (the
addresses may repeat between runs: each run has its own isolated LAN).
Leaving the context manager (also on error) kills any process still inside
one of its namespaces (by PID, from ``ip netns pids``), deletes the veths and
the bridge by name, then deletes the namespaces by name.

:class:`NetnsDeployment` is :class:`~tests.harness.processes.FlowerDeployment`
with every command prefixed by ``ip netns exec <ns>`` (``ip`` execs the
command in place, so the tracked PID is the Flower process itself):

* ``flower-superlink`` in the SuperLink namespace, bound to its namespace
  address (``--host 10.231.0.1``); its server certificate gets that IP as SAN;
* ``flower-supernode`` *i* in the namespace of node *i*, connecting to
  ``10.231.0.1:<port>``; its local ClientApp Runtime API stays on
  ``127.0.0.1`` of its own namespace;
* every ``flwr`` CLI call (register, ls, run) and ``make_certs.sh`` in the
  operator namespace, so the Control API is also used over the bridge.

Usage::

    with VirtualNetwork.for_federation(n_nodes=3) as net:
        dep = NetnsDeployment(workdir, net)
        try:
            dep.start_superlink(); dep.write_flwr_config()
            dep.register_nodes(range(3))
            for i in range(3):
                dep.start_supernode(i, node_config={...})
            dep.wait_nodes_online(3)
            dep.run_app(app_dir, run_config={...})
        finally:
            dep.stop_all()
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.processes import (
    MAKE_CERTS_SH,
    DeploymentError,
    FlowerDeployment,
    ManagedProcess,
    pid_alive,
)

__all__ = [
    "NetnsDeployment",
    "NetnsHost",
    "NetnsUnavailable",
    "VirtualNetwork",
    "netns_support_problem",
]

DEFAULT_SUBNET = "10.231.0.0/24"
BRIDGE = "br0"
HOST_IFACE = "eth0"
_ROLE_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, ...)."""


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise DeploymentError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def list_netns() -> set[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    if shutil.which("ip") is None:
        return set()
    out = _ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def netns_support_problem() -> str | None:
    """None if namespaces can be made here, else a human-readable reason.

    Tries for real: creates and deletes one namespace with a unique name.
    """
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return f"not running as root (euid {os.geteuid()}); `ip netns add` needs root"
    name = f"fm{os.getpid()}x{secrets.token_hex(3)}-probe"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        veth = _ip(
            "-n", name, "link", "add", "pa", "type", "veth", "peer", "name", "pb", check=False
        )
        if veth.returncode != 0:
            return f"cannot create veth pairs: {veth.stderr.strip()}"
        bridge = _ip("-n", name, "link", "add", "pbr", "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"cannot create bridges: {bridge.stderr.strip()}"
        # `ip netns exec` also needs a private mount namespace and to remount /sys.
        run = subprocess.run(["ip", "netns", "exec", name, "true"], capture_output=True,
                             text=True, timeout=20, check=False)
        if run.returncode != 0:
            return f"`ip netns exec` failed: {run.stderr.strip()}"
        return None
    finally:
        if name in list_netns():
            _ip("netns", "del", name, check=False)


@dataclass(frozen=True)
class NetnsHost:
    """One virtual host: its role, namespace name, bridge-side veth and address."""

    role: str
    netns: str
    ip: str
    bridge_port: str  # name of the veth end in the bridge namespace


class VirtualNetwork:
    """A private /24 across network namespaces joined by a bridge.

    Parameters
    ----------
    hosts : role -> host number in the subnet (``{"superlink": 1}`` gives
        ``10.231.0.1``). Roles are short lowercase names (``[a-z][a-z0-9]*``).
    subnet : an IPv4 /24 (or any prefix) that does not need to be free on the
        machine: it only exists inside the namespaces.
    tag : base of the namespace names; default ``fm<pid>x<random>``.
    """

    def __init__(
        self,
        hosts: Mapping[str, int],
        *,
        subnet: str = DEFAULT_SUBNET,
        tag: str | None = None,
    ) -> None:
        net = ipaddress.ip_network(subnet, strict=True)
        if not net.is_private or net.version != 4:
            raise ValueError(f"subnet must be a private IPv4 network, got {subnet}")
        self.subnet = net
        self.tag = tag or f"fm{os.getpid()}x{secrets.token_hex(3)}"
        self.bridge_ns = f"{self.tag}-bridge"
        self.hosts: dict[str, NetnsHost] = {}
        seen: set[str] = set()
        for k, (role, num) in enumerate(hosts.items()):
            if not _ROLE_RE.match(role) or role == "bridge":
                raise ValueError(f"bad role name {role!r}")
            ip = str(net.network_address + int(num))
            if ipaddress.ip_address(ip) not in net or ip in (
                str(net.network_address),
                str(net.broadcast_address),
            ):
                raise ValueError(f"host number {num} not usable in {subnet}")
            if ip in seen:
                raise ValueError(f"address {ip} given twice")
            seen.add(ip)
            self.hosts[role] = NetnsHost(role, f"{self.tag}-{role}", ip, f"v{k}")
        self.created: list[str] = []  # namespaces made by us, in order
        self.killed: list[int] = []  # PIDs killed at teardown (should stay empty)

    @classmethod
    def for_federation(
        cls, n_nodes: int, *, subnet: str = DEFAULT_SUBNET, tag: str | None = None
    ) -> VirtualNetwork:
        """SuperLink .1, operator (flwr CLI) .2, SuperNode i at .(11 + i)."""
        hosts = {"superlink": 1, "operator": 2}
        hosts.update({f"node{i}": 11 + i for i in range(n_nodes)})
        return cls(hosts, subnet=subnet, tag=tag)

    # ------------------------------------------------------------ lookups
    def ip(self, role: str) -> str:
        return self.hosts[role].ip

    def ns(self, role: str) -> str:
        return self.hosts[role].netns

    def exec_prefix(self, role: str) -> list[str]:
        """``ip netns exec <ns>``: prepend to a command to run it on host ``role``."""
        return ["ip", "netns", "exec", self.ns(role)]

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_ns, *(h.netns for h in self.hosts.values())]

    # ------------------------------------------------------------ build
    def __enter__(self) -> VirtualNetwork:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        """Create namespaces, bridge, veths, addresses. Cleans up on failure."""
        problem = netns_support_problem()
        if problem:
            raise NetnsUnavailable(problem)
        clash = set(self.namespaces) & list_netns()
        if clash:
            raise DeploymentError(f"network namespaces already exist: {sorted(clash)}")
        plen = self.subnet.prefixlen
        try:
            for ns in self.namespaces:
                _ip("netns", "add", ns)
                self.created.append(ns)
            br = ["-n", self.bridge_ns]
            _ip(*br, "link", "add", BRIDGE, "type", "bridge")
            _ip(*br, "link", "set", BRIDGE, "up")
            for host in self.hosts.values():
                # Both veth ends are made from the bridge namespace: the host
                # end is created directly inside the host namespace.
                _ip(*br, "link", "add", host.bridge_port, "type", "veth",
                    "peer", "name", HOST_IFACE, "netns", host.netns)
                _ip(*br, "link", "set", host.bridge_port, "master", BRIDGE)
                _ip(*br, "link", "set", host.bridge_port, "up")
                hn = ["-n", host.netns]
                _ip(*hn, "link", "set", "lo", "up")
                _ip(*hn, "addr", "add", f"{host.ip}/{plen}", "dev", HOST_IFACE)
                _ip(*hn, "link", "set", HOST_IFACE, "up")
        except BaseException:
            self.destroy()
            raise

    # ------------------------------------------------------------ inspect
    def pids(self) -> dict[str, list[int]]:
        """Processes currently inside each namespace we made (``ip netns pids``)."""
        out: dict[str, list[int]] = {}
        for ns in self.created:
            res = _ip("netns", "pids", ns, check=False)
            pids = [int(p) for p in res.stdout.split() if p.isdigit()]
            if pids:
                out[ns] = pids
        return out

    def addresses(self) -> dict[str, list[str]]:
        """IPv4 addresses on each host's ``eth0`` (role -> list)."""
        out: dict[str, list[str]] = {}
        for role, host in self.hosts.items():
            res = _ip("-n", host.netns, "-4", "-o", "addr", "show", "dev", HOST_IFACE, check=False)
            out[role] = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", res.stdout)
        return out

    def can_connect(self, role: str, ip: str, port: int, timeout: float = 2.0) -> bool:
        """TCP connect from host ``role`` to ``ip:port`` (bash ``/dev/tcp``)."""
        cmd = [*self.exec_prefix(role), "timeout", str(timeout),
               "bash", "-c", f"exec 3<>/dev/tcp/{ip}/{int(port)}"]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=timeout + 10,
                                  check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def leftovers(self) -> list[str]:
        """What of this network still exists: namespaces, or root-ns links with our tag."""
        left = sorted(set(self.namespaces) & list_netns())
        links = _ip("-o", "link", "show", check=False).stdout if shutil.which("ip") else ""
        left += [f"link:{line.split(':')[1].strip()}" for line in links.splitlines()
                 if self.tag in line]
        return left

    # ------------------------------------------------------------ teardown
    def destroy(self, kill_timeout: float = 5.0) -> None:
        """Tear everything down, by name. Safe to call twice.

        Processes still inside our namespaces are SIGKILLed by PID first (a
        namespace with a live process would outlive ``ip netns del``); their
        PIDs are recorded in :attr:`killed`.
        """
        errors: list[str] = []
        deadline = time.monotonic() + kill_timeout
        while (left := self.pids()) and time.monotonic() < deadline:
            for pids in left.values():
                for pid in pids:
                    if pid != os.getpid():
                        self.killed.append(pid)
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if self.bridge_ns in self.created:
            for host in self.hosts.values():
                # Deleting one end of a veth removes its peer as well.
                _ip("-n", self.bridge_ns, "link", "del", host.bridge_port, check=False)
            _ip("-n", self.bridge_ns, "link", "del", BRIDGE, check=False)
        existing = list_netns()
        for ns in reversed(self.created):
            if ns in existing:
                res = _ip("netns", "del", ns, check=False)
                if res.returncode != 0:
                    errors.append(f"{ns}: {res.stderr.strip()}")
        self.created = [ns for ns in self.created if ns in list_netns()]
        self.killed = sorted(set(self.killed))
        if errors or self.created:
            raise DeploymentError(f"network teardown incomplete: {errors or self.created}")


class NetnsDeployment(FlowerDeployment):
    """:class:`FlowerDeployment` whose processes run in a :class:`VirtualNetwork`.

    ``net`` must already be created (the constructor runs ``make_certs.sh``
    in the operator namespace). Roles default to those of
    :meth:`VirtualNetwork.for_federation`: ``superlink``, ``operator``
    (``flwr`` CLI and helpers) and ``node<i>`` for SuperNode ``i``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        net: VirtualNetwork,
        *,
        superlink_role: str = "superlink",
        operator_role: str = "operator",
        node_roles: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.net = net
        self.superlink_role = superlink_role
        self.operator_role = operator_role
        self.node_roles = list(node_roles) if node_roles is not None else sorted(
            (r for r in net.hosts if re.fullmatch(r"node\d+", r)), key=lambda r: int(r[4:])
        )
        for role in (superlink_role, operator_role, *self.node_roles):
            if role not in net.hosts:
                raise ValueError(f"role {role!r} is not a host of the network")
        if not net.created:
            raise DeploymentError("create the VirtualNetwork before the deployment")
        self._spawn_role = operator_role  # namespace for the next _spawn
        kwargs.setdefault("n_nodes", len(self.node_roles))
        env = dict(kwargs.pop("env", None) or {})
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # nothing outside the /24 anyway
        super().__init__(workdir, env=env, **kwargs)
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
            self.env.pop(var, None)  # the flwr CLI must talk to the SuperLink directly
        if self.tls and self._san not in self._cert_sans():
            self.make_certs()  # certs_dir given without our SAN: re-issue server cert

    # ------------------------------------------------------------ addresses
    @property
    def superlink_host(self) -> str:
        return self.net.ip(self.superlink_role)

    @property
    def address(self) -> str:  # what SuperNodes and the flwr CLI connect to
        if self.port is None:
            raise DeploymentError("SuperLink not started")
        return f"{self.superlink_host}:{self.port}"

    # ------------------------------------------------------------ certificates
    @property
    def _san(self) -> str:
        return f"IP:{self.superlink_host}"

    def _cert_sans(self) -> str:
        path = self.certs_dir / "server.san"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def make_certs(self, n_nodes: int | None = None) -> Path:
        """make_certs.sh with the SuperLink's namespace address as extra SAN."""
        n_nodes = self.n_nodes if n_nodes is None else n_nodes
        self._check(
            ["bash", str(MAKE_CERTS_SH), str(self.certs_dir), str(n_nodes), self._san],
            "make_certs",
            timeout=120,
        )
        return self.certs_dir

    # ------------------------------------------------------------ process plumbing
    @contextlib.contextmanager
    def _on(self, role: str) -> Iterator[None]:
        previous, self._spawn_role = self._spawn_role, role
        try:
            yield
        finally:
            self._spawn_role = previous

    def _spawn(self, name: str, cmd: list[str], flwr_home: Path | None = None) -> ManagedProcess:
        return super()._spawn(name, self.net.exec_prefix(self._spawn_role) + cmd, flwr_home)

    def _wait_port(self, proc: ManagedProcess, timeout: float) -> None:
        """Wait until the SuperLink port answers *from the operator namespace*.

        (The base class connects from the test process, i.e. the root
        namespace, which has no route to the virtual LAN.)
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise DeploymentError(
                    f"{proc.name} exited (rc={proc.returncode}):\n{proc.log_text()[-4000:]}"
                )
            if self.net.can_connect(self.operator_role, self.superlink_host, int(self.port or 0)):
                return
            time.sleep(0.2)
        raise DeploymentError(f"{proc.name} {self.address} not reachable after {timeout}s")

    # ------------------------------------------------------------ processes
    def start_superlink(self, **kwargs: Any) -> ManagedProcess:
        """``flower-superlink --host <superlink ip>`` in the SuperLink namespace."""
        saved = self.host
        self.host = self.superlink_host  # base class uses self.host for --host
        try:
            with self._on(self.superlink_role):
                return super().start_superlink(**kwargs)
        finally:
            self.host = saved  # LOOPBACK: SuperNodes' local Runtime API

    def start_supernode(self, index: int, **kwargs: Any) -> ManagedProcess:
        """SuperNode ``index`` in namespace ``node_roles[index]``."""
        with self._on(self.node_roles[index]):
            return super().start_supernode(index, **kwargs)

    # ------------------------------------------------------------ checks
    def superlink_requests(self) -> list[tuple[str, str]]:
        """``(client ip, path)`` of each request in the SuperLink's access log.

        flwr logs every non-routine HTTP request (node activation, Control API
        calls, ...) as ``<ip>:<port> - "POST /v1/... HTTP/1.1" 200``; routine
        polling is hidden unless the log level is DEBUG.
        """
        if self.superlink is None:
            return []
        pattern = r'(\d+\.\d+\.\d+\.\d+):\d+ - "[A-Z]+ (\S+) HTTP'
        return re.findall(pattern, self.superlink.log_text())

    def superlink_client_addresses(self, path_contains: str = "") -> set[str]:
        """Client IPs in the SuperLink's access log (optionally for some paths)."""
        return {ip for ip, path in self.superlink_requests() if path_contains in path}

    def netns_pids(self) -> dict[str, list[int]]:
        """Live processes inside the network's namespaces (should be {} after stop_all)."""
        return {ns: [p for p in pids if pid_alive(p)] for ns, pids in self.net.pids().items()
                if any(pid_alive(p) for p in pids)}
