"""The vectorised engine gives what the sequential (reference) engine gives.

Deterministic mode, same seeds and batch order: after several rounds both
engines hold the same meta-parameters to float tolerance, with missing
modalities, SGD and Adam inner optimisers, unequal client sizes, a regression
task, and with DP (server- and client-side clipping, same noise seed).
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from fedmeta.config import build_config
from fedmeta.data import build_dataset
from fedmeta.data.base import ClientData, DatasetSpec, ModalitySpec, split_clients
from fedmeta.client import configure_torch, model_for
from fedmeta.federation import run_federation
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.engines.vectorized import ClientStore, VectorizedBackend
from fedmeta.meta import params_of
from fedmeta.results import RunWriter

ATOL = 1e-5

SMALL = [
    "data.num_clients=16",
    "data.examples_per_client=20",
    "data.missing_modality_fraction=0.5",
    "model.embed_dim=8",
    "model.hidden_dim=8",
    "meta.inner_steps=4",
    "meta.eval_steps=5",
    "meta.inner_batch_size=4",
    "simulation.rounds=3",
    "simulation.clients_per_round=6",
    "simulation.eval_every=2",
    "simulation.chunk_size=4",  # > 1 chunk per cohort
    "output.progress=false",
]


def _run(cfg, dataset, backend_cls, out):
    configure_torch(1)
    backend = backend_cls(cfg, dataset)
    theta0 = params_of(model_for(cfg, dataset.spec))
    writer = RunWriter(out)
    summary = run_federation(cfg, backend, theta0, writer)
    return writer.load_checkpoint()["server"]["theta"], summary


def _assert_same(cfg, dataset, tmp_path):
    theta_seq, sum_seq = _run(cfg, dataset, SequentialBackend, tmp_path / "seq")
    theta_vec, sum_vec = _run(cfg, dataset, VectorizedBackend, tmp_path / "vec")
    assert theta_seq.keys() == theta_vec.keys()
    worst = max(float((theta_seq[k] - theta_vec[k]).abs().max()) for k in theta_seq)
    assert worst < ATOL, f"meta-parameters differ by {worst}"
    moved = max(float((theta_seq[k] - params_of(model_for(cfg, dataset.spec))[k]).abs().max()) for k in theta_seq)
    assert moved > 1e-3  # the run actually trained
    for key, value in sum_seq.items():  # evaluation metrics agree too
        if key.startswith("heldout_") and isinstance(value, float) and math.isfinite(value):
            assert sum_vec[key] == pytest.approx(value, abs=1e-4), key
    assert sum_vec["engine"] == "vectorized"
    return sum_seq, sum_vec


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_same_meta_parameters_with_missing_modalities(tmp_path, optimizer):
    cfg = build_config({}, SMALL + [f"meta.inner_optimizer={optimizer}", "meta.inner_lr=" + ("0.3" if optimizer == "sgd" else "0.01")])
    dataset = build_dataset(cfg.data)
    assert any(not bool(dataset.client(c).present.all()) for c in range(cfg.data.num_clients))  # some modality is missing
    _assert_same(cfg, dataset, tmp_path)


def test_same_meta_parameters_full_batch_and_fedavg(tmp_path):
    cfg = build_config({}, SMALL + ["meta.inner_batch_size=0", "meta.algorithm=fedavg", "model.fusion=attention"])
    _assert_same(cfg, build_dataset(cfg.data), tmp_path)


@pytest.mark.parametrize(
    "algorithm,extra",
    [("maml", []), ("fomaml", []), ("fomaml", ["meta.maml_query_fraction=0.3"]), ("fedavg_ft", []), ("local", [])],
)
def test_same_meta_parameters_other_algorithms(tmp_path, algorithm, extra):
    cfg = build_config({}, SMALL + [f"meta.algorithm={algorithm}", "meta.inner_lr=0.1", "simulation.rounds=2"] + extra)
    dataset = Ragged(build_dataset(cfg.data))  # unequal sizes: meta-query rows are gathered per client
    if algorithm == "local":
        theta_seq, _ = _run(cfg, dataset, SequentialBackend, tmp_path / "seq")
        theta_vec, _ = _run(cfg, dataset, VectorizedBackend, tmp_path / "vec")
        assert all(torch.equal(theta_seq[k], theta_vec[k]) for k in theta_seq)
        return
    _assert_same(cfg, dataset, tmp_path)


# -- unequal client sizes and a regression task ------------------------------------


class Ragged:
    """Synthetic clients cut to different sizes (like a Dirichlet partition): n and n_support vary."""

    def __init__(self, base) -> None:
        self.base, self.spec, self.num_clients = base, base.spec, base.num_clients
        self.train_clients, self.heldout_clients = base.train_clients, base.heldout_clients

    def client(self, cid: int) -> ClientData:
        full = self.base.client(cid)
        n_support = full.n_support - cid % 3  # 3 support sizes
        n_query = (full.n - full.n_support) - (cid % 2) * 2  # 2 query sizes
        keep = torch.cat([torch.arange(n_support), full.n_support + torch.arange(n_query)])
        return ClientData({k: v[keep] for k, v in full.x.items()}, full.y[keep], full.present[keep], n_support)


@pytest.mark.parametrize("batch_size", [4, 0])
def test_same_meta_parameters_unequal_client_sizes(tmp_path, batch_size):
    cfg = build_config({}, SMALL + [f"meta.inner_batch_size={batch_size}"])
    dataset = Ragged(build_dataset(cfg.data))
    assert len({(dataset.client(c).n, dataset.client(c).n_support) for c in range(cfg.data.num_clients)}) == 6
    _assert_same(cfg, dataset, tmp_path)


class Sine:
    """A small regression population (vector modality), sizes varying per client."""

    def __init__(self, num_clients: int = 16, seed: int = 0) -> None:
        self.spec = DatasetSpec((ModalitySpec("x", "vector", (1,)),), task="regression", num_classes=0, output_dim=1)
        self.num_clients = num_clients
        split = split_clients(num_clients, 0.2, seed)
        self.train_clients, self.heldout_clients = split.train, split.heldout
        self.seed = seed

    def client(self, cid: int) -> ClientData:
        g = np.random.default_rng([self.seed, cid])
        n = 16 + 2 * (cid % 3)
        amp, phase = g.uniform(0.1, 5.0), g.uniform(0, np.pi)
        x = g.uniform(-5, 5, size=(n, 1)).astype(np.float32)
        y = (amp * np.sin(x + phase)).astype(np.float32)
        return ClientData({"x": torch.from_numpy(x)}, torch.from_numpy(y), torch.ones(n, 1, dtype=torch.bool), n // 2)


def test_same_meta_parameters_regression(tmp_path):
    cfg = build_config({}, SMALL + ["meta.inner_lr=0.01", "meta.eval_steps=10", "model.hidden_dim=40"])
    sum_seq, sum_vec = _assert_same(cfg, Sine(), tmp_path)
    assert sum_vec["heldout_mse_after_steps"]["10"] == pytest.approx(sum_seq["heldout_mse_after_steps"]["10"], abs=1e-4)


# -- every built-in dataset ----------------------------------------------------------


def _builtin(name: str, cfg):
    """The built-in dataset ``name`` (through ``build_dataset`` once it is wired there)."""
    from fedmeta.data.base import DataError

    try:
        return build_dataset(cfg.data.model_copy(update={"dataset": name}))
    except DataError:
        pass
    if name == "sine":
        from fedmeta.data.sine import SineDataset

        return SineDataset(num_clients=cfg.data.num_clients, k_shot=5, examples_per_client=15, seed=cfg.data.seed)
    if name == "avdigits":
        from fedmeta.data.avdigits import AVDigits

        # Dirichlet partitions of ~1,800 images: unequal sizes; one modality missing on some clients
        return AVDigits(num_clients=cfg.data.num_clients, examples_per_client=48, missing_modality_fraction=0.3, seed=cfg.data.seed)
    raise AssertionError(name)


class Cached:
    """A dataset whose clients are built once (avdigits clients take ~50 ms each to build)."""

    def __init__(self, base) -> None:
        self.spec, self.num_clients = base.spec, base.num_clients
        self.train_clients, self.heldout_clients = base.train_clients, base.heldout_clients
        self.client = functools.lru_cache(maxsize=None)(base.client)


@pytest.mark.parametrize("name", ["sine", "avdigits"])
def test_same_meta_parameters_builtin_datasets(tmp_path, name):
    extra = ["data.num_clients=40", "simulation.clients_per_round=8"] + (["meta.inner_lr=0.01"] if name == "sine" else [])
    cfg = build_config({}, SMALL + extra)
    dataset = Cached(_builtin(name, cfg))
    if name == "avdigits":
        sizes = {(dataset.client(c).n, dataset.client(c).n_support) for c in range(cfg.data.num_clients)}
        assert len(sizes) > 1  # Dirichlet partition: unequal clients, grouped and padded
    _assert_same(cfg, dataset, tmp_path)


# -- differential privacy (same noise seed) -----------------------------------------


@pytest.mark.parametrize("mode", ["server", "client"])
def test_same_meta_parameters_with_dp(tmp_path, mode):
    cfg = build_config(
        {},
        SMALL
        + ["privacy.enabled=true", "simulation.sampling=poisson", f"privacy.mode={mode}", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.5", "simulation.deterministic=true",
           "privacy.reproducible_noise=true"],  # the same noise in both engines
    )
    sum_seq, sum_vec = _assert_same(cfg, build_dataset(cfg.data), tmp_path)
    assert math.isfinite(sum_seq["epsilon"]) and sum_seq["epsilon"] > 0
    assert sum_vec["epsilon"] == sum_seq["epsilon"]  # the same rounds accounted at the same q


# -- the store and the engine's other promises -------------------------------------


def test_store_is_lazy_and_stacked():
    cfg = build_config({}, ["data.num_clients=10000", "data.missing_modality_fraction=0.3"])
    dataset = build_dataset(cfg.data)
    store = ClientStore(dataset)
    store.ensure([3, 9999, 3])
    assert int(store.built.sum()) == 2
    assert store.x["image"].shape == (80, 8, 8)  # one tensor per modality holding the built clients' rows, not one object per client
    ref = dataset.client(9999)
    got = store.client(9999)
    assert got.n_support == ref.n_support
    for k in ref.x:
        assert torch.equal(got.x[k], ref.x[k])
    assert torch.equal(got.y, ref.y) and torch.equal(got.present, ref.present)


def test_store_grows_for_a_larger_client():
    cfg = build_config({}, ["data.num_clients=12"])
    dataset = Ragged(build_dataset(cfg.data))
    dataset.examples_per_client = 0
    store = ClientStore(dataset)
    store.ensure([1])  # 38 rows
    store.ensure([0])  # 40 rows: the slots grow
    for cid in (0, 1):
        ref = dataset.client(cid)
        assert torch.equal(store.client(cid).x["audio"], ref.x["audio"]) and torch.equal(store.client(cid).y, ref.y)


class OneHuge:
    """Client 0 holds 50 clients' rows (2,000); every other client is cut to 8 support + 4 query rows."""

    def __init__(self, base) -> None:
        self.base, self.spec, self.num_clients = base, base.spec, base.num_clients

    def client(self, cid: int) -> ClientData:
        full = self.base.client(cid)
        if cid == 0:
            reps = 50
            return ClientData({k: v.repeat(reps, *[1] * (v.dim() - 1)) for k, v in full.x.items()}, full.y.repeat(reps),
                              full.present.repeat(reps, 1), full.n_support * reps)
        keep = torch.cat([torch.arange(8), full.n_support + torch.arange(4)])
        return ClientData({k: v[keep] for k, v in full.x.items()}, full.y[keep], full.present[keep], 8)


def test_store_allocates_the_clients_rows_not_clients_times_the_largest():
    """One huge client among 199 small ones: the store holds about the sum of the sizes (ragged), and
    reads give each client its own rows, with padding zeros, never a neighbour's rows."""
    dataset = OneHuge(build_dataset(build_config({}, ["data.num_clients=200", "data.missing_modality_fraction=0.3"]).data))
    store = ClientStore(dataset)
    cids = list(range(1, 100)) + [0] + list(range(100, 200))  # the huge one in the middle
    store.ensure(cids)
    sizes = [dataset.client(c).n for c in range(200)]
    one = dataset.client(1)
    per_row = sum(v[0].numel() for v in (*one.x.values(), one.y, one.present))
    assert sum(sizes) == 2000 + 199 * 12 and max(sizes) == 2000
    assert store.used == sum(sizes)
    assert sum(sizes) * per_row <= store.allocated() <= 2 * sum(sizes) * per_row  # capacity doubles at most
    assert store.allocated() * 50 < 200 * max(sizes) * per_row  # padded slots would be 200 x 2,000 rows
    for cid in (0, 1, 99, 100, 199):
        ref, got = dataset.client(cid), store.client(cid)
        assert got.n_support == ref.n_support and torch.equal(got.y, ref.y) and torch.equal(got.present, ref.present)
        assert all(torch.equal(got.x[k], ref.x[k]) for k in ref.x)
    # a chunk's support, padded to 20 rows: a small client's rows 12.. are zeros (not the next client's rows)
    idx = torch.tensor([99, 0, 100])
    x, y, present = store.support(idx, torch.device("cpu"), rows=20)
    assert y.shape == (3, 20) and torch.equal(y[0, :12], dataset.client(99).y) and torch.equal(y[1], dataset.client(0).y[:20])
    assert not bool(present[0, 12:].any()) and not bool(y[0, 12:].any()) and all(not bool(v[0, 12:].any()) for v in x.values())
    assert all(torch.equal(x[k][2, :12], dataset.client(100).x[k]) for k in x)
    qx, qy, qp = store.query(torch.tensor([5, 150]), torch.device("cpu"))
    assert torch.equal(qy[1], dataset.client(150).y[8:]) and torch.equal(qp[0], dataset.client(5).present[8:])
    picked = store.take(torch.tensor([0, 7]), torch.tensor([[1999, 0], [3, 11]]), torch.device("cpu"))[1]
    assert picked.tolist() == [[dataset.client(0).y[1999].item(), dataset.client(0).y[0].item()], dataset.client(7).y[[3, 11]].tolist()]


def test_device_is_validated_and_missing_cuda_is_a_clear_error():
    """GPU numbers come from the device machine (docs/benchmarks.md); here: CPU paths and errors."""
    from fedmeta.config import ConfigError
    from fedmeta.client import resolve_device
    from fedmeta.federation import RunError

    with pytest.raises(ConfigError, match="simulation.device"):
        build_config({}, ["simulation.device=gpu0"])
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.slow
def test_flower_and_vectorized_agree(tmp_path):
    """The real Flower Simulation Engine (Ray) against the vectorised engine (~60 s: Ray start-up)."""
    from fedmeta.cli import run_simulation

    overrides = SMALL + ["simulation.rounds=2", "simulation.eval_every=100", "simulation.eval_clients=1"]
    thetas = {}
    for engine in ("flower", "vectorized"):
        cfg = build_config({}, overrides + [f"simulation.engine={engine}"])
        run_simulation(cfg, tmp_path / engine, progress=False)
        thetas[engine] = torch.load(tmp_path / engine / "model.pt")
    a, b = thetas["flower"], thetas["vectorized"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < ATOL


def test_bench_command_writes_json(tmp_path, monkeypatch, capsys):
    """``fedmeta bench`` on a tiny workload (the vectorised engine only; Flower is the slow test below)."""
    from fedmeta import bench

    monkeypatch.setattr(bench, "WORKLOAD", ["meta.inner_steps=2", "meta.inner_batch_size=8"])  # the report follows WORKLOAD
    out = tmp_path / "bench.json"
    args = bench.argparse.Namespace(engines="vectorized", clients=4, rounds=1, population=0, json=str(out), chunk_size=None, threads=None)
    assert bench.cmd_bench(args) == 0
    result = json.loads(out.read_text())
    w = result["workload"]
    assert (w["inner_steps"], w["inner_batch_size"]) == (2, 8) and w["overrides"][:2] == bench.WORKLOAD
    assert "inner_steps=2, inner_batch_size=8" in capsys.readouterr().out  # the table's title
    for engine in ("vectorized",):
        entry = result["engines"][engine]
        assert entry["updates_per_s"] > 0 and entry["startup_s"] > 0 and entry["peak_rss_mb"] > 50
        # the round times are the round loop's own (metrics.jsonl time_s), and the rate follows from them exactly
        assert len(entry["round_times_s"]) == 1 and entry["updates_per_s"] == pytest.approx(4 / entry["round_times_s"][0])
        assert entry["gflops_per_s"] == pytest.approx(entry["updates_per_s"] * result["flops_per_update"] / 1e9)
        assert entry["bmm_fraction"] == pytest.approx(entry["gflops_per_s"] / result["ceilings"]["bmm_gflops"])
        assert entry["updates_per_cpu_s"] > 0
    assert result["ceilings"]["matmul_2048_gflops"] > 0 and result["ceilings"]["bmm_gflops"] > 0


def test_bench_is_a_cli_command():
    from fedmeta.cli import build_parser

    args = build_parser().parse_args(["bench", "--clients", "10", "--rounds", "2", "--engines", "vectorized"])
    assert args.clients == 10 and args.engines == "vectorized"


@pytest.mark.slow
def test_bench_flower_engine(tmp_path):
    from fedmeta import bench

    result = bench.bench(["flower"], clients=4, rounds=1, population=bench.default_population(4))
    entry = result["engines"]["flower"]
    assert entry["updates_per_s"] > 0 and entry["startup_s"] > 0 and entry["peak_rss_mb"] > 100


def test_store_memory_script_builds_the_training_population(tmp_path, capsys):
    """experiments/store_memory.py (docs/benchmarks.md section 7) on a small population: every training client
    built, the allocation the ragged store's (rows of the built clients, at most doubled), one JSON line."""
    from experiments import store_memory

    config = tmp_path / "c.toml"
    config.write_text("[data]\nnum_clients = 30\n")
    assert store_memory.main(["--config", str(config)]) == 0
    result = json.loads(capsys.readouterr().out)
    dataset = build_dataset(build_config({}, ["data.num_clients=30"]).data)
    one = dataset.client(dataset.train_clients[0])
    per_row = sum(v[0].numel() for v in (*one.x.values(), one.y, one.present))
    assert result["built"] == result["clients"] == len(dataset.train_clients) and result["error"] is None
    assert result["rows_of_built_clients"] == sum(dataset.client(c).n for c in dataset.train_clients)
    assert result["rows_of_built_clients"] * per_row <= result["allocated_elements"] <= 2 * result["rows_of_built_clients"] * per_row
    assert store_memory.main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


class OneRowClients(Ragged):
    """Every third client keeps a single support row (a small Dirichlet share, as on avdigits' disjoint pool)."""

    def client(self, cid: int) -> ClientData:
        full = self.base.client(cid)
        if cid % 3:
            return full
        keep = torch.cat([torch.arange(1), full.n_support + torch.arange(full.n - full.n_support)])
        return ClientData({k: v[keep] for k, v in full.x.items()}, full.y[keep], full.present[keep], 1)


@pytest.mark.parametrize("algorithm", ["fomaml", "maml"])
def test_a_client_with_one_support_row_trains_under_a_held_back_meta_query(tmp_path, algorithm):
    """meta.maml_query_fraction holds back part of the support rows; a client with one row has none to spare: that
    row is its inner loop's and its meta-query's (it used to end the run with a ValueError), the same on both engines."""
    from fedmeta.client import ClientSizes, train_rows
    from fedmeta.meta.algorithm import build_algorithm

    cfg = build_config({}, SMALL + [f"meta.algorithm={algorithm}", "meta.maml_query_fraction=0.3", "simulation.rounds=2"])
    rows = train_rows(cfg, build_algorithm(cfg), ClientSizes(1, 5))
    assert (rows.n_inner, rows.query_start, rows.n_query) == (1, 0, 1)
    dataset = OneRowClients(build_dataset(cfg.data))
    assert any(dataset.client(c).n_support == 1 for c in dataset.train_clients)
    _assert_same(cfg, dataset, tmp_path)
