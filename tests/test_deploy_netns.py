"""fedmeta on Flower's Deployment Engine across network namespaces (not loopback).

Five network namespaces made by this test (root + iproute2 required; CI runs
as root, so a missing capability FAILS, it does not skip):

* ``<tag>-superlink`` 10.231.0.1  flower-superlink (TLS, --enable-supernode-auth)
* ``<tag>-operator``  10.231.0.2  flwr CLI: register keys, ls, run
* ``<tag>-node{0,1,2}`` 10.231.0.11-13  one SuperNode each, own partition dir
* ``<tag>-bridge``    the bridge br0 and the host-side veth ends

Nothing is created in the root namespace and no namespace has a default
route, so traffic stays on the private /24. Everything (processes by PID,
veths, bridge, namespaces by name) is removed at the end, also on failure
(try/finally in the test plus a fixture finaliser), and the test asserts
that nothing is left.
"""

import json
import subprocess
import sys

import pytest

from tests.harness.netns import NetnsDeployment, VirtualNetwork, netns_support_problem
from procs import pids_with_cmdline

from test_deploy_fedmeta import DATA, N, ROOT, TRAIN, run_config  # the same federation as on loopback

SUBNET = "10.231.0.0/24"


@pytest.fixture
def net(request):
    problem = netns_support_problem()
    if problem:
        pytest.fail(
            f"this test needs to create network namespaces (root + iproute2), but: {problem}",
            pytrace=False,
        )
    network = VirtualNetwork.for_federation(N, subnet=SUBNET)
    request.addfinalizer(network.destroy)  # safety net; destroy() is idempotent
    network.create()
    return network


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_federation_across_three_namespaces(net, tmp_path):
    parts = tmp_path / "partitions"
    sets = [a for k, v in DATA.items() for a in ("--set", f"{k}={v}")]
    subprocess.run([sys.executable, "-m", "fedmeta.cli", "partition", *sets, "--out", str(parts)], check=True, timeout=120)

    node_ips = [net.ip(f"node{i}") for i in range(N)]
    assert node_ips == ["10.231.0.11", "10.231.0.12", "10.231.0.13"]
    assert net.addresses() == {
        "superlink": ["10.231.0.1"], "operator": ["10.231.0.2"], **{f"node{i}": [ip] for i, ip in enumerate(node_ips)}
    }

    work = tmp_path / "deploy"
    dep = NetnsDeployment(work, net, n_nodes=N)
    out = tmp_path / "run"
    ok = False
    try:
        dep.start_superlink()
        assert dep.address.startswith("10.231.0.1:")
        cfg = dep.write_flwr_config().read_text()
        assert f'address = "{dep.address}"' in cfg
        assert "IP:10.231.0.1" in (dep.certs_dir / "server.san").read_text()
        dep.register_nodes(range(N))
        for i in range(N):
            dep.start_supernode(i, node_config={"partition-dir": str(parts / f"client_{i:05d}"), "device": "cpu"})
        dep.wait_nodes_online(N, timeout=120)

        res = dep.run_app(ROOT, run_config=run_config(out, rounds=2), timeout=240)
        assert res.status == "finished:completed", res.output[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["engine"] == "flower"
        assert summary["rounds_completed"] == 2 and summary["failures"] == 0
        rs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rs] == [1, 2]
        assert all(r["replies"] == len(TRAIN) for r in rs)

        # The SuperLink's access log names the peer of each non-routine request:
        # every SuperNode activated from its own namespace address, every
        # Control API call came from the operator namespace, nothing from
        # loopback or from outside the /24.
        assert dep.superlink_client_addresses("/v1/fleet/activate-node") == set(node_ips)
        assert dep.superlink_client_addresses("/v1/control/") == {net.ip("operator")}
        assert dep.superlink_client_addresses() <= {net.ip(r) for r in net.hosts}
        ok = True
    finally:
        if not ok:
            dep.dump_logs()
        dep.stop_all()
        left_pids = dep.live_pids()
        in_netns = dep.netns_pids()
        net.destroy()
    assert not left_pids, f"processes left running: {left_pids}"
    assert not in_netns, f"processes left inside the namespaces: {in_netns}"
    assert not net.killed, f"teardown had to kill: {net.killed}"
    assert not net.leftovers(), f"left behind: {net.leftovers()}"
    assert not pids_with_cmdline(str(work)), "a process still refers to the deployment directory"
