"""Issue 13: fedmeta on a Ray cluster, and populations larger than memory.

* quick: the config fields and their cross-checks; a worker's Ray resources (one GPU per
  worker with device cuda); the memory-mapped store (1,000 clients) equals the in-memory
  population, client by client and as the vectorised engine's θ.
* slow (CI): one local two-node Ray cluster (``ray.cluster_utils.Cluster``: two raylets on
  this host) for every case. The vectorised engine with ``workers = 2`` (one actor per node)
  gives the in-process engine's θ to 1e-5 with server-mode DP (noise added once, on the
  server); Flower's Simulation Engine joins the cluster through ``simulation.ray_address``
  and completes 2 rounds. Every process the cluster started is stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from fedmeta.config import ConfigError, build_config
from fedmeta.data import build_dataset
from fedmeta.federation import RunError

ATOL = 1e-5


# -- quick ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["simulation.workers=2"], "simulation.workers: Ray workers run the vectorized engine only"),
        (["simulation.workers=-1", "simulation.engine=vectorized"], "simulation.workers: must be >= 0 (got -1)"),
        (["simulation.ray_address=auto", "simulation.engine=sequential"], "simulation.ray_address: used by engine 'flower' or by simulation.workers > 0 only"),
        (["simulation.ray_address=auto", "simulation.engine=vectorized"], "simulation.ray_address: used by engine 'flower' or by simulation.workers > 0 only"),
        (["simulation.ray_address=not an address"], "simulation.ray_address: must be '' (a private local Ray instance), 'auto', 'host:port'"),
        (["simulation.num_gpus_per_client=0.5", "simulation.engine=vectorized"], "simulation.num_gpus_per_client: Ray client resources of engine 'flower' only"),
        (["simulation.num_gpus_per_client=0.5"], "simulation.num_gpus_per_client: the clients would hold a GPU and compute on the CPU"),
        (["simulation.num_gpus_per_client=-0.5", "simulation.device=cuda"], "simulation.num_gpus_per_client: must be >= 0"),
    ],
)
def test_config_refuses(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert str(err.value).startswith(f"config error: {message}"), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["simulation.engine=vectorized", "simulation.workers=4", "simulation.ray_address=auto"],
        ["simulation.engine=vectorized", "simulation.workers=2", "simulation.ray_address=10.0.0.5:6379", "simulation.device=cuda"],
        ["simulation.ray_address=ray://head.example:10001", "simulation.num_gpus_per_client=0.25", "simulation.device=cuda"],
        ["simulation.ray_address=auto"],
    ],
)
def test_config_accepts(overrides):
    build_config(None, overrides)


def test_flower_backend_config():
    from fedmeta.engines.flower import ray_backend_config

    local = ray_backend_config(build_config(None, []))
    assert local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert local["init_args"]["address"] == "local" and local["init_args"]["num_cpus"] >= 1  # never joins a cluster by accident
    joined = ray_backend_config(build_config(None, ["simulation.ray_address=auto", "simulation.num_gpus_per_client=0.25", "simulation.device=cuda"]))
    assert joined["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert joined["init_args"]["address"] == "auto" and "num_cpus" not in joined["init_args"]  # ray.init refuses num_cpus when joining


def test_worker_resources_one_gpu_each():
    from fedmeta.engines.ray_cluster import actor_resources

    assert actor_resources("cpu", 2, cluster_gpus=4) == {"num_cpus": 1, "num_gpus": 0}
    assert actor_resources("cuda", 2, cluster_gpus=2) == {"num_cpus": 1, "num_gpus": 1}
    assert actor_resources("cuda:1", 4, cluster_gpus=8) == {"num_cpus": 1, "num_gpus": 1}
    assert actor_resources("auto", 2, cluster_gpus=2) == {"num_cpus": 1, "num_gpus": 1}
    assert actor_resources("auto", 2, cluster_gpus=1) == {"num_cpus": 1, "num_gpus": 0}
    with pytest.raises(RunError, match="one GPU per worker, but the Ray cluster has 1"):
        actor_resources("cuda", 2, cluster_gpus=1)


def _run_in_process(cfg, out, dataset=None):
    from fedmeta.client import configure_torch
    from fedmeta.components import components_of
    from fedmeta.federation import run_federation
    from fedmeta.meta.algorithm import initial_meta_parameters
    from fedmeta.results import RunWriter

    components = components_of(cfg, dataset or build_dataset(cfg.data, cfg.model.modalities), with_engine=True)
    backend = components.engine.backend(cfg, components)  # the vectorized engine: in process, or its Ray workers
    configure_torch(1)
    theta0 = initial_meta_parameters(components.model(components.dataset().spec), components.algorithm)
    try:
        run_federation(cfg, backend, theta0, RunWriter(out), algorithm=components.algorithm)
    finally:
        if hasattr(backend, "close"):
            backend.close()
    return torch.load(out / "model.pt"), [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], backend


def test_store_equals_in_memory_population(tmp_path):
    """1,000 clients written as a store, read back through the memory maps: the same clients, the same θ."""
    from fedmeta.data.store import StoreDataset, write_store

    base = ["data.num_clients=1000", "data.examples_per_client=20", "simulation.engine=vectorized", "simulation.clients_per_round=40",
            "simulation.rounds=2", "simulation.eval_every=1", "simulation.eval_clients=20", "output.progress=false"]
    cfg_mem = build_config(None, base)
    dataset = build_dataset(cfg_mem.data)
    write_store(dataset, tmp_path / "store", flush_every=300)
    store = StoreDataset(tmp_path / "store", num_clients=1000)
    assert store.train_clients == dataset.train_clients and store.heldout_clients == dataset.heldout_clients
    assert store.spec == dataset.spec
    for cid in (0, 1, 499, 999):
        a, b = dataset.client(cid), store.client(cid)
        assert a.n_support == b.n_support and torch.equal(a.y, b.y) and torch.equal(a.present, b.present)
        assert all(torch.equal(a.x[k], b.x[k]) for k in a.x)
    cfg_store = build_config(None, base + ["data.dataset=store", f"data.path={tmp_path / 'store'}"])
    theta_mem, metrics_mem, _ = _run_in_process(cfg_mem, tmp_path / "mem")
    theta_store, metrics_store, backend = _run_in_process(cfg_store, tmp_path / "mapped")
    assert backend.store.mapped and not backend.store.padded and backend.store.x["image"].shape[0] == 1000 * 20  # ragged: the rows back to back
    for k in theta_mem:
        torch.testing.assert_close(theta_store[k], theta_mem[k], atol=0, rtol=0)
    assert metrics_store[-1]["heldout_loss_after"] == metrics_mem[-1]["heldout_loss_after"]


def test_store_refuses_a_wrong_population(tmp_path):
    from fedmeta.data import DataError
    from fedmeta.data.store import StoreDataset, write_store

    write_store(build_dataset(build_config(None, ["data.num_clients=10", "data.examples_per_client=20", "simulation.clients_per_round=2"]).data), tmp_path / "s")
    with pytest.raises(DataError, match="data.num_clients: is 12, but .* holds 10 clients"):
        StoreDataset(tmp_path / "s", num_clients=12)
    with pytest.raises(DataError, match="not a fedmeta store"):
        StoreDataset(tmp_path)


# -- slow: one local two-node Ray cluster for every case ---------------------------------


@pytest.fixture(scope="module")
def cluster():
    """Two raylets on this host (a head node and a second node, one CPU each); every process it starts is stopped by PID."""
    from ray.cluster_utils import Cluster

    from tests.harness.processes import descendant_pids, pid_alive

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, old_path) if p)  # the raylets' workers import this fedmeta
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    before = descendant_pids(os.getpid())
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    started: set[int] = set()
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        started |= descendant_pids(os.getpid()) - before
        yield c
    finally:
        import ray

        started |= descendant_pids(os.getpid()) - before
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        deadline = time.time() + 15
        while time.time() < deadline and any(pid_alive(p) for p in started):
            time.sleep(0.2)
        for pid in [p for p in started if pid_alive(p)]:  # only processes this fixture started
            os.kill(pid, signal.SIGKILL)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
        time.sleep(0.5)
        assert not [p for p in started if pid_alive(p)], "processes of the test cluster survived"


@pytest.mark.slow
def test_vectorized_workers_on_two_nodes_equal_in_process_with_dp(cluster, tmp_path):
    """workers = 2 on the two-node cluster: one actor per node, θ and the evaluation (test and validation clients) equal the in-process engine's."""
    base = ["data.num_clients=40", "data.validation_fraction=0.2", "data.examples_per_client=20", "simulation.engine=vectorized", "simulation.clients_per_round=12",
            "simulation.rounds=3", "simulation.eval_every=1", "simulation.chunk_size=4", "output.progress=false",
            "privacy.enabled=true", "privacy.mode=server", "simulation.sampling=poisson", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.5",
            "privacy.reproducible_noise=true"]  # the same noise and cohorts in both runs
    theta_ref, metrics_ref, _ = _run_in_process(build_config(None, base), tmp_path / "in-process")
    cfg = build_config(None, base + ["simulation.workers=2", f"simulation.ray_address={cluster.address}"])
    theta, metrics, backend = _run_in_process(cfg, tmp_path / "workers")
    assert len({p["node"] for p in backend.placement}) == 2, backend.placement  # one worker per raylet
    for k in theta_ref:
        torch.testing.assert_close(theta[k], theta_ref[k], atol=ATOL, rtol=0)
    assert [m["clients"] for m in metrics] == [m["clients"] for m in metrics_ref]
    assert metrics[-1]["epsilon"] == metrics_ref[-1]["epsilon"]
    assert metrics[-1]["heldout_loss_after"] == pytest.approx(metrics_ref[-1]["heldout_loss_after"], abs=ATOL)
    assert metrics[-1]["val_loss_after"] == pytest.approx(metrics_ref[-1]["val_loss_after"], abs=ATOL)  # validation clients too


@pytest.mark.slow
def test_a_stateful_method_on_the_workers_equals_in_process(cluster, tmp_path):
    """SCAFFOLD with workers = 2: the driver holds the client state and ships each worker its sub-cohort's rows;
    θ and every client's c_i equal the in-process engine's (returning clients use the state the other worker left)."""
    base = ["data.num_clients=12", "data.examples_per_client=20", "simulation.engine=vectorized", "simulation.clients_per_round=5",
            "simulation.rounds=4", "simulation.eval_every=100", "simulation.chunk_size=2", "meta.algorithm=scaffold", "output.progress=false"]
    theta_ref, _, ref = _run_in_process(build_config(None, base), tmp_path / "in-process")
    theta, _, backend = _run_in_process(build_config(None, base + ["simulation.workers=2", f"simulation.ray_address={cluster.address}"]), tmp_path / "workers")
    for k in theta_ref:
        torch.testing.assert_close(theta[k], theta_ref[k], atol=1e-6, rtol=0)
    states, states_ref = backend.client_states.state_dict(), ref.client_states.state_dict()
    assert states.keys() == states_ref.keys() and len(states) > 5  # clients came back in later rounds
    for cid in states_ref:
        for k in states_ref[cid]:
            torch.testing.assert_close(states[cid][k], states_ref[cid][k], atol=1e-6, rtol=0)
    assert "clients" in torch.load(tmp_path / "workers" / "checkpoint.pt")  # checkpointed with the run, by the driver


@pytest.mark.slow
def test_flower_simulation_joins_the_cluster(cluster, tmp_path):
    """The Flower Simulation Engine on the running cluster (simulation.ray_address), 2 rounds."""
    import ray

    from fedmeta.engines.flower import simulate_flower

    cfg = build_config(None, ["data.num_clients=6", "data.examples_per_client=20", "simulation.clients_per_round=2", "simulation.rounds=2",
                              "simulation.eval_every=2", "output.progress=false", f"simulation.ray_address={cluster.address}"])
    summary = simulate_flower(cfg, tmp_path / "flower", progress=False)
    assert summary["rounds_completed"] == 2 and summary["failures"] == 0
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)  # the cluster outlives the run
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    finally:
        ray.shutdown()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"workers": [0, -1]}, "--workers: must be >= 0"),
        ({"cluster": 1}, "--cluster: the number of Ray nodes, >= 2"),
        ({"store": "/nonexistent/store"}, "--store /nonexistent/store: not a readable store"),
        ({"device": "tpu"}, "--device: string should match pattern"),
    ],
)
def test_bench_refuses_bad_scale_out_options(changes, message, capsys):
    from fedmeta import bench

    args = bench.argparse.Namespace(engines="vectorized", clients=4, rounds=1, population=0, json=None, chunk_size=None, threads=None,
                                    workers=[0], cluster=0, store=None, device=None)
    for k, v in changes.items():
        setattr(args, k, v)
    assert bench.cmd_bench(args) == 2
    assert message in capsys.readouterr().err
