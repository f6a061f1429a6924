"""fedmeta on Flower's Deployment Engine: TLS, SuperNode authentication, partitions on disk, a node killed mid-run.

Real processes on loopback: one SuperLink, three SuperNodes (one per client
partition written by `fedmeta partition`), `flwr run` against the repo's app.
Every process is stopped by PID at the end, also when a test fails.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmeta.data import split_clients
from tests.harness.processes import FlowerDeployment

ROOT = Path(__file__).resolve().parents[1]
N = 3
DATA = {"data.num_clients": N, "data.heldout_fraction": 0.34, "data.examples_per_client": 20, "simulation.clients_per_round": 2}
TRAIN = split_clients(N, 0.34, 0).train  # 2 training clients, 1 held out


def run_config(out: Path, rounds: int, round_timeout: float = 40.0) -> dict:
    return {
        **DATA,
        "data.dataset": "disk",
        "simulation.rounds": rounds,
        "simulation.eval_every": rounds,
        "simulation.min_clients": 1,
        "simulation.round_timeout": round_timeout,
        "output.dir": str(out),
        "output.progress": False,
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedmeta-deploy")
    parts = root / "partitions"
    sets = [a for k, v in DATA.items() for a in ("--set", f"{k}={v}")]
    subprocess.run([sys.executable, "-m", "fedmeta.cli", "partition", *sets, "--out", str(parts)], check=True, timeout=120)
    dep = FlowerDeployment(root, n_nodes=N)
    try:
        dep.start_superlink()
        dep.write_flwr_config()
        dep.register_nodes(range(N))
        for i in range(N):
            dep.start_supernode(i, node_config={"partition-dir": str(parts / f"client_{i:05d}"), "device": "auto"})
        dep.wait_nodes_online(N, timeout=90)
        yield dep
    except BaseException:
        dep.dump_logs()
        raise
    finally:
        dep.stop_all()
        assert not dep.live_pids(), "processes left running"


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


# Every message makes a SuperNode start a fresh flwr-clientapp process (torch + flwr + fedmeta imports: 5-7 s
# idle, several times that at load average 8-10 on 2 cores, plus the FAB install on a node's first message).
# With a 40 s round timeout, replies that took longer were dropped and counted as failures (4 in one loaded CI
# run). Here every node is alive, so the server waits for every reply: send_and_receive returns as soon as all
# replies are in, and the round timeout is only a backstop that a healthy reply never reaches.
WAIT_FOR_EVERY_REPLY = 900.0


@pytest.mark.slow
def test_two_rounds_over_tls_with_authenticated_supernodes(federation, tmp_path):
    out = tmp_path / "run"
    res = federation.run_app(ROOT, run_config=run_config(out, rounds=2, round_timeout=WAIT_FOR_EVERY_REPLY), timeout=3600)
    if res.status != "finished:completed":
        federation.dump_logs()
    assert res.status == "finished:completed", res.output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == "flower"
    assert summary["rounds_completed"] == 2 and summary["failures"] == 0
    rs = records(out)
    assert [r["round"] for r in rs] == [1, 2]
    assert all(r["replies"] == len(TRAIN) for r in rs)
    assert 0.0 <= summary["heldout_acc_after"] <= 1.0  # the held-out node was evaluated


@pytest.mark.slow
def test_a_supernode_killed_mid_run_is_counted_and_the_run_completes(federation, tmp_path):
    out = tmp_path / "run"
    # the long round timeout again: the dead node's messages come back as NODE_UNAVAILABLE error replies once
    # the SuperLink misses its heartbeats (flwr: 30 s interval x patience 2), not by racing a timeout
    proc = federation.start_run(ROOT, run_config=run_config(out, rounds=3, round_timeout=WAIT_FOR_EVERY_REPLY))
    deadline = time.time() + 1800
    while time.time() < deadline and not records(out):
        time.sleep(0.5)
    assert records(out), "round 1 never finished"
    victim = TRAIN[0]  # SuperNode i holds client i
    federation.kill_supernode(victim, sig=signal.SIGKILL)
    res = federation.wait_run(proc, timeout=3600)
    if res.status != "finished:completed":
        federation.dump_logs()
    assert res.status == "finished:completed", res.output[-3000:]
    rs = records(out)
    assert [r["round"] for r in rs] == [1, 2, 3]
    assert rs[0]["failures"] == 0
    assert sum(r["failures"] for r in rs[1:]) >= 1  # the dead node's rounds are counted as failures
    assert all(r["replies"] >= 1 and not r["skipped"] for r in rs)  # the survivor kept the run going
    assert json.loads((out / "summary.json").read_text())["failures"] >= 1
