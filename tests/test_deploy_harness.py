"""End-to-end tests of the Flower Deployment Engine process harness.

Spins up a real ``flower-superlink`` with TLS + SuperNode authentication and
real ``flower-supernode`` processes on 127.0.0.1, runs a tiny self-contained
Flower App (written into a temp dir by this file) with ``flwr run``, and checks
that every process is gone afterwards.

Slow (~1 min): marked ``slow``.
"""

from __future__ import annotations

import json
import shutil
import signal
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness.processes import FlowerDeployment, pid_alive

pytestmark = [pytest.mark.slow]


def test_deployment_tools_are_installed():
    """CI must have them (flwr's CLI from the project, openssl and ssh-keygen from the image): fail, never skip."""
    missing = [t for t in ("flower-superlink", "flower-supernode", "flwr", "openssl", "ssh-keygen") if shutil.which(t) is None]
    assert not missing, f"missing tools: {missing}"

N_NODES = 3  # registered SuperNodes (key indices 0..N_NODES-1)
UNREGISTERED = N_NODES  # key index whose public key is never registered
EXTRA = N_NODES + 1  # key index used by the kill-by-PID test

TINY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"
description = "fedmeta deployment harness test app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedmeta"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
num-rounds = 2
result-file = "/tmp/tinyapp-result.json"
timeout = 60.0
fail-partition = -1
sleep-partition = -1
sleep-seconds = 0.0
"""

TINY_CLIENT = '''\
import os
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    pid = int(context.node_config.get("partition-id", -1))
    if int(cfg["fail-partition"]) == pid:
        raise RuntimeError(f"boom from partition {pid}")
    if int(cfg["sleep-partition"]) == pid:
        time.sleep(float(cfg["sleep-seconds"]))
    arr = msg.content["arrays"].to_numpy_ndarrays()[0]
    return Message(
        content=RecordDict(
            {
                "arrays": ArrayRecord([arr + 1.0]),
                "metrics": MetricRecord({"partition-id": pid, "os-pid": os.getpid()}),
                "info": ConfigRecord(
                    {
                        "partition-dir": str(context.node_config.get("partition-dir", "")),
                        "device": str(context.node_config.get("device", "")),
                    }
                ),
            }
        ),
        reply_to=msg,
    )
'''

TINY_SERVER = '''\
import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    arr = np.zeros(3, dtype=np.float32)
    out = {"rounds": []}
    for rnd in range(1, int(rc["num-rounds"]) + 1):
        node_ids = sorted(grid.get_node_ids())
        cfg = ConfigRecord(
            {
                "round": rnd,
                "fail-partition": int(rc["fail-partition"]),
                "sleep-partition": int(rc["sleep-partition"]) if rnd == 1 else -1,
                "sleep-seconds": float(rc["sleep-seconds"]),
            }
        )
        msgs = [
            Message(
                content=RecordDict({"arrays": ArrayRecord([arr]), "config": cfg}),
                message_type=MessageType.TRAIN,
                dst_node_id=nid,
                group_id=str(rnd),
            )
            for nid in node_ids
        ]
        t0 = time.time()
        replies = list(grid.send_and_receive(msgs, timeout=float(rc["timeout"])))
        ok = [r for r in replies if not r.has_error()]
        out["rounds"].append(
            {
                "round": rnd,
                "sent_to": node_ids,
                "seconds": time.time() - t0,
                "ok": [
                    {
                        "node": r.metadata.src_node_id,
                        "partition-id": r.content["metrics"]["partition-id"],
                        "partition-dir": r.content["info"]["partition-dir"],
                        "device": r.content["info"]["device"],
                    }
                    for r in ok
                ],
                "errors": [
                    {
                        "node": r.metadata.src_node_id,
                        "code": r.error.code,
                        "reason": r.error.reason,
                    }
                    for r in replies
                    if r.has_error()
                ],
            }
        )
        if ok:
            arr = np.mean([r.content["arrays"].to_numpy_ndarrays()[0] for r in ok], axis=0)
    out["final"] = arr.tolist()
    with open(rc["result-file"], "w", encoding="utf-8") as fh:
        json.dump(out, fh)
'''


def write_tiny_app(root: Path) -> Path:
    """Write the tiny Flower App into ``root/tinyapp`` and return its path."""
    app_dir = root / "tinyapp"
    pkg = app_dir / "tinyapp"
    pkg.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(TINY_PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "client.py").write_text(textwrap.dedent(TINY_CLIENT))
    (pkg / "server.py").write_text(textwrap.dedent(TINY_SERVER))
    return app_dir


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink (TLS + node auth) with N_NODES registered, running SuperNodes."""
    root = tmp_path_factory.mktemp("deploy")
    dep = FlowerDeployment(root, n_nodes=N_NODES + 2)
    try:
        dep.start_superlink()
        dep.write_flwr_config()
        dep.register_nodes(range(N_NODES))
        for i in range(N_NODES):
            dep.start_supernode(
                i,
                node_config={
                    "partition-id": i,
                    "partition-dir": str(root / f"part-{i}"),
                    "device": "cpu",
                },
            )
        # Nodes that must be refused; started now so their (slow) process
        # start-up overlaps with the rest of the setup.
        dep.start_supernode(UNREGISTERED, name="supernode-unregistered")
        # TLS with system CAs only -> our self-signed CA is not trusted.
        dep.start_supernode(
            0, name="supernode-no-root-cert", root_certificates=None, max_retries=1, max_wait_time=3
        )
        # Plain HTTP against the HTTPS SuperLink (node auth needs TLS, so no key).
        dep.start_supernode(
            0, name="supernode-insecure", insecure=True, private_key=None,
            max_retries=1, max_wait_time=3,
        )
        dep.wait_nodes_online(N_NODES, timeout=60)
        dep.app_dir = write_tiny_app(root)  # type: ignore[attr-defined]
        yield dep
    except BaseException:
        dep.dump_logs()
        raise
    finally:
        dep.stop_all()
        left = dep.live_pids()
        assert not left, f"processes left after stop_all: {sorted(left)}"


def _online_ids(dep: FlowerDeployment) -> set[int]:
    return {int(n["node-id"]) for n in dep.list_nodes() if n["status"] == "online"}


def test_tls_node_auth_two_rounds(deployment, tmp_path):
    dep = deployment
    result_file = tmp_path / "result.json"
    res = dep.run_app(
        dep.app_dir,
        run_config={"num-rounds": 2, "result-file": str(result_file), "timeout": 60.0},
        timeout=180,
    )
    if res.status != "finished:completed":
        dep.dump_logs()
    assert res.returncode == 0, res.output
    assert res.status == "finished:completed", res.output
    data = json.loads(result_file.read_text())
    registered = set(dep.node_ids.values())
    assert len(data["rounds"]) == 2
    for rnd in data["rounds"]:
        assert not rnd["errors"]
        assert set(rnd["sent_to"]) == registered
        assert {r["node"] for r in rnd["ok"]} == registered
        # node_config reached the ClientApp Context
        assert sorted(r["partition-id"] for r in rnd["ok"]) == list(range(N_NODES))
        for r in rnd["ok"]:
            assert r["device"] == "cpu"
            assert r["partition-dir"].endswith(f"part-{r['partition-id']}")
    assert data["final"] == [2.0, 2.0, 2.0]


def test_unregistered_supernode_is_refused(deployment):
    dep = deployment
    proc = dep.supernodes["supernode-unregistered"]
    rc = proc.wait(timeout=60)
    log = proc.log_text()
    assert rc != 0, log
    assert "Failed to activate SuperNode" in log, log
    assert "Exit Code: 305" in log, log
    # Not visible to the federation: only the registered nodes are known/online
    # (test_tls_node_auth_two_rounds also checks the run only saw those).
    nodes = dep.list_nodes()
    assert {int(n["node-id"]) for n in nodes} == set(dep.node_ids.values())
    assert _online_ids(dep) == set(dep.node_ids.values())


@pytest.mark.parametrize("mode", ["no-root-cert", "insecure"])
def test_supernode_without_ca_cannot_connect(deployment, mode):
    dep = deployment
    proc = dep.supernodes[f"supernode-{mode}"]
    rc = proc.wait(timeout=60)
    log = proc.log_text()
    assert rc != 0, log
    assert "Exit Code: 305" in log, log
    assert "could not establish a connection" in log, log
    if mode == "no-root-cert":
        assert "CERTIFICATE_VERIFY_FAILED" in log, log
    assert _online_ids(dep) == set(dep.node_ids.values())


def test_kill_supernode_by_pid(deployment):
    """Kill a running SuperNode (and its SuperExec) by PID; nothing survives."""
    dep = deployment
    dep.register_nodes([EXTRA])
    sn = dep.start_supernode(EXTRA, node_config={"partition-id": EXTRA})
    dep.wait_nodes_online(N_NODES + 1, timeout=60)
    children = sn.snapshot_descendants()
    assert children, "SuperNode should have spawned flower-superexec"
    assert dep.kill_supernode(EXTRA, sig=signal.SIGKILL) == sn.pid
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid_alive(p) for p in sn.all_pids()):
        time.sleep(0.1)
    assert not [p for p in sn.all_pids() if pid_alive(p)]
    assert dep.superlink is not None and dep.superlink.alive()
