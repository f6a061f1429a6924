"""``fedmeta bench``: the engines side by side on one workload.

    fedmeta bench --clients 100 --rounds 5 [--population P] [--json FILE] [--engines flower,vectorized,sequential]
    fedmeta bench --engines vectorized --workers 0 1 2 --cluster 2      # the vectorised engine on Ray workers (issue 13)
    fedmeta bench --engines vectorized --clients 10000 --store DIR       # a memory-mapped population (fedmeta partition --format store)

Workload (the same for every engine): the default model, ``meta.inner_steps=5``,
``meta.inner_batch_size=16``, a synthetic population of P clients, N clients
per round (fixed-size sampling), R timed rounds.

Each engine runs in its own subprocess (so peak memory does not mix) through
the real round loop (:func:`fedmeta.federation.run_federation`, or the Flower
ServerApp for ``flower``). It runs R + 2 rounds: round 1 is warm-up and counts
as start-up (Ray workers starting, first-call overheads), rounds 2..R+1 are
timed, the last round (which evaluates) is not. Round times are the engine's
own: the ``time_s`` the round loop writes into each ``metrics.jsonl`` line
(a timer around the round inside the process that runs it), never file polling.

* ``updates_per_s``: N * R / (sum of the timed rounds' ``time_s``);
* ``gflops_per_s`` / ``matmul_fraction`` / ``bmm_fraction``: ``updates_per_s`` times the FLOPs of
  one client update (``torch.utils.flop_counter.FlopCounterMode`` on one client's update), and that
  as a fraction of two ceilings measured in the same run on one thread: a 2048² matmul and a
  ``torch.bmm`` shaped like the workload's first layer ([N, 16, 64] x [N, 64, 32]);
* the ``torch-loop`` row: the reference a plain PyTorch user would write, one ``nn.Module`` per
  client, ``loss.backward()`` and ``torch.optim.SGD`` on the same batch schedules, then the same
  server step (:class:`fedmeta.federation.Server`); timed per round with ``time.perf_counter``;
* the ``pfl`` row (``--pfl-python PY``): pfl-research 0.6 Reptile on the same clients, batches and theta0, run by
  ``experiments/pfl_reptile.py`` in pfl's own interpreter (pfl pins ``dp-accounting<0.6``); skipped with one
  line when the option is absent or that interpreter cannot import pfl. ``theta_max_abs_diff``: its final theta
  against the ``torch-loop`` reference's (:func:`run_pfl`);
* ``updates_per_cpu_s``: N * R / the engine process's CPU time over the timed rounds (in-process engines
  only; on a shared machine it is what the engine would do with a core to itself);
* ``startup_s``: worker start (before importing torch/flwr) to the end of round 1,
  including building the population (in-process engines build every client up front,
  so their rounds measure compute; Flower's clients build their data on first use);
* ``peak_rss_mb``: the peak of the summed RSS of the worker and all its descendants
  (Ray's GCS, raylet and workers for ``flower``; plus the Ray actors and their descendants for
  ``vectorized`` with workers), sampled every 0.25 s, and at least the
  worker's own ``ru_maxrss``. Shared pages count once per process, so for ``flower`` it
  over-states; ``peak_pss_mb`` (proportional set size) is the fairer sum. ``peak_anon_mb``: the same
  for anonymous memory only (what cannot be dropped; a store's mapped file pages are page cache).

``--workers 0 1 2``: the vectorised engine once per value (0: in-process, N: N Ray actors, each building its
shard up front). ``--cluster K`` first starts a local K-node Ray cluster (``ray.cluster_utils.Cluster``,
``cpu_count / K`` CPUs per node) that every run with workers joins, and stops it (by PID) at the end; without
it each such run starts a private local Ray. ``--store DIR``: the population is the store in DIR
(``data.dataset = "store"``), nothing is built up front.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENGINES = ("flower", "vectorized", "sequential", "torch-loop", "pfl")
WORKLOAD = ["meta.inner_steps=5", "meta.inner_batch_size=16"]


def workload_settings() -> dict:
    """``WORKLOAD`` as values (``{"inner_steps": 5, "inner_batch_size": 16}``): what the report and the table print."""
    from fedmeta.config import parse_override

    return {key.rsplit(".", 1)[-1]: value for key, value in map(parse_override, WORKLOAD)}


def default_population(clients: int, heldout_fraction: float = 0.2) -> int:
    """The smallest population whose training split holds ``clients`` clients."""
    p = max(clients + 1, math.ceil(clients / (1 - heldout_fraction)))
    while p - max(1, round(heldout_fraction * p)) < clients:
        p += 1
    return p


def bench_overrides(clients: int, rounds: int, population: int, chunk_size: int | None = None, store: str | None = None,
                    device: str | None = None) -> list[str]:
    out = WORKLOAD + [
        f"data.num_clients={population}",
        f"simulation.clients_per_round={clients}",
        f"simulation.rounds={rounds + 2}",
        f"simulation.eval_every={rounds + 3}",  # only the last (untimed) round evaluates
        "simulation.eval_clients=1",
        f"output.checkpoint_every={rounds + 3}",
        "output.progress=false",
    ]
    if chunk_size:
        out.append(f"simulation.chunk_size={chunk_size}")
    if store:
        out += ["data.dataset=store", f"data.path={Path(store).resolve()}"]
    if device:
        out.append(f"simulation.device={device}")  # vectorized with workers: one GPU per worker with cuda
    return out


def store_population(store: str) -> int:
    """The number of clients in a store directory (its ``store.json``)."""
    from fedmeta.data.store import STORE_FILE

    return int(json.loads((Path(store) / STORE_FILE).read_text())["num_clients"])


# -- memory of a process tree ---------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_memory_mb(root: int, *more: int) -> tuple[float, float, float]:
    """(summed RSS, summed PSS, summed anonymous RSS) in MiB of ``root`` (and ``more``) and their descendants (Linux /proc)."""
    kids, todo, rss, pss, anon, seen = _children(), [root, *more], 0, 0, 0, set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Anonymous:"):
                        anon += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024, anon / 1024


def round_times(metrics: Path) -> dict[int, float]:
    """``{round: time_s}`` from a run's ``metrics.jsonl``: the round loop's own timer (see the module docstring)."""
    out: dict[int, float] = {}
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
            out[int(rec["round"])] = float(rec["time_s"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


class Watcher(threading.Thread):
    """Samples the tree's memory (and notes when each round's metrics line appears: start-up of the Flower engine only)."""

    def __init__(self, metrics: Path, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.metrics, self.interval = metrics, interval
        self.round_done: dict[int, float] = {}
        self.peak_rss = self.peak_pss = self.peak_anon = 0.0
        self.extra: list[int] = []  # more process trees to count (Ray actors outside this process's tree)
        self.stop = threading.Event()

    def poll(self) -> None:
        if self.metrics.exists():
            for line in self.metrics.read_text().splitlines():
                try:
                    rnd = int(json.loads(line)["round"])
                except (ValueError, KeyError, TypeError):
                    continue
                self.round_done.setdefault(rnd, time.perf_counter())
        rss, pss, anon = tree_memory_mb(os.getpid(), *self.extra)
        self.peak_rss, self.peak_pss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_pss, pss), max(self.peak_anon, anon)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.poll()


# -- one engine, in this process (the subprocess side) ----------------------------------


class _Prebuilt:
    """The dataset with every client built up front (the sequential loop then measures compute)."""

    def __init__(self, dataset) -> None:
        self.spec, self.num_clients = dataset.spec, dataset.num_clients
        self.train_clients, self.heldout_clients = dataset.train_clients, dataset.heldout_clients
        self._clients = [dataset.client(c) for c in range(dataset.num_clients)]

    def client(self, cid: int):
        return self._clients[cid]


def run_engine(engine: str, overrides: list[str], out_dir: Path, threads: int | None = None) -> dict:
    """Run one engine on the workload; returns its measurements."""
    t0 = time.perf_counter()
    import resource

    from fedmeta.config import build_config

    if engine == "torch-loop":
        return run_torch_loop(overrides, t0)
    cfg = build_config({}, overrides + [f"simulation.engine={engine}"])
    nodes = 0
    watcher = Watcher(out_dir / "metrics.jsonl")
    watcher.start()
    ends: dict[int, float] = {}  # in-process engines: perf_counter at the end of each round (the round loop's callback)
    cpu: dict[int, float] = {}  # ... and this process's CPU time then (robust to other jobs on a shared machine)
    if engine == "flower":
        from fedmeta.engines.flower import simulate_flower

        simulate_flower(cfg, out_dir, progress=False)
    else:
        from fedmeta.client import configure_torch, model_for
        from fedmeta.components import resolve_components
        from fedmeta.federation import run_federation
        from fedmeta.meta import params_of
        from fedmeta.results import RunWriter

        components = resolve_components(cfg)
        dataset = components.dataset()
        if engine == "vectorized":
            from fedmeta.engines import vectorized

            if threads:
                vectorized.THREADS = threads
            backend = components.engine.backend(cfg, components)  # VectorizedBackend, or RayVectorizedBackend with simulation.workers
            watcher.extra = [p["pid"] for p in getattr(backend, "placement", [])]
            nodes = len({p["node"] for p in getattr(backend, "placement", [])})
            backend.prefetch()
        else:
            from fedmeta.engines.sequential import SequentialBackend

            backend = SequentialBackend(cfg, components.with_dataset(_Prebuilt(dataset)))
            if threads:
                configure_torch(threads)
        theta0 = params_of(model_for(cfg, dataset.spec, components))
        try:
            run_federation(cfg, backend, theta0, RunWriter(out_dir), progress=lambda rec: (ends.setdefault(int(rec["round"]), time.perf_counter()),
                                                                                 cpu.setdefault(int(rec["round"]), time.process_time())),
                           algorithm=components.algorithm)
        finally:
            if hasattr(backend, "close"):
                backend.close()
    watcher.stop.set()
    watcher.join()
    watcher.poll()
    rounds = cfg.simulation.rounds - 2
    times = round_times(out_dir / "metrics.jsonl")
    timed = sum(times[r] for r in range(2, rounds + 2))
    first_end = ends.get(1, watcher.round_done.get(1, time.perf_counter()))  # Flower: the ServerApp's metrics line
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch

    return {
        "updates_per_s": cfg.simulation.clients_per_round * rounds / timed,
        "round_times_s": [times[r] for r in range(2, rounds + 2)],
        "updates_per_cpu_s": cfg.simulation.clients_per_round * rounds / (cpu[rounds + 1] - cpu[1]) if cpu else None,
        "startup_s": first_end - t0,
        "round_s": timed / rounds,
        "peak_rss_mb": max(watcher.peak_rss, own),
        "peak_pss_mb": max(watcher.peak_pss, 0.0),
        "peak_anon_mb": watcher.peak_anon,
        "workers": cfg.simulation.workers,
        "worker_nodes": nodes if engine == "vectorized" else 0,
        "torch_threads": torch.get_num_threads(),
        "clients_per_round": cfg.simulation.clients_per_round,
        "timed_rounds": rounds,
        "population": cfg.data.num_clients,
    }


def run_torch_loop(overrides: list[str], t0: float, keep_theta: bool = False) -> dict:
    """The plain-PyTorch reference row: per client ``load_state_dict`` + ``backward()`` + ``torch.optim.SGD``
    on the same batch schedules as the engines, then fedmeta's server step; each round timed in process."""
    import resource

    import torch
    import torch.nn.functional as F

    from fedmeta.client import configure_torch, model_for, train_schedule
    from fedmeta.config import build_config
    from fedmeta.data import build_dataset
    from fedmeta.federation import ClientUpdate, Server, sample_cohort
    from fedmeta.meta import params_of

    cfg = build_config({}, overrides + ["simulation.engine=sequential"])
    configure_torch(1)
    dataset = build_dataset(cfg.data, cfg.model.modalities)
    clients = [dataset.client(c) for c in range(dataset.num_clients)]
    model = model_for(cfg, dataset.spec)
    server = Server(cfg, params_of(model), len(dataset.train_clients))
    rounds = cfg.simulation.rounds - 2
    times, first_end, cpu = [], 0.0, []
    for rnd in range(1, rounds + 2):
        start = time.perf_counter()
        updates = []
        for cid in sample_cohort(cfg, list(dataset.train_clients), rnd):
            data = clients[cid]
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(server.theta[name])
            opt = torch.optim.SGD(model.parameters(), lr=cfg.meta.inner_lr)
            for idx in train_schedule(cfg, data, rnd, cid):
                opt.zero_grad()
                F.cross_entropy(model({k: v[idx] for k, v in data.x.items()}, data.present[idx]), data.y[idx]).backward()
                opt.step()
            updates.append(ClientUpdate(cid, {k: v.detach().clone() for k, v in model.named_parameters()}, data.n_support))
        server.step(updates, rnd)
        end = time.perf_counter()
        cpu.append(time.process_time())
        if rnd == 1:
            first_end = end
        else:
            times.append(end - start)
    n = cfg.simulation.clients_per_round
    return {
        "updates_per_s": n * rounds / sum(times),
        "round_times_s": times,
        "updates_per_cpu_s": n * rounds / (cpu[-1] - cpu[0]),
        "startup_s": first_end - t0,
        "round_s": sum(times) / rounds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_pss_mb": 0.0,
        "peak_anon_mb": 0.0,
        "workers": 0,
        "worker_nodes": 0,
        "torch_threads": torch.get_num_threads(),
        "clients_per_round": n,
        "timed_rounds": rounds,
        "population": cfg.data.num_clients,
    } | ({"theta": server.theta} if keep_theta else {})


PFL_SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "pfl_reptile.py"


def pfl_workload(overrides: list[str]) -> dict:
    """What ``experiments/pfl_reptile.py`` needs to train the bench's rounds 1..R+1 exactly as fedmeta would: the
    spec and model settings, theta0, the inner SGD settings, the outer step size per round, and per round the cohort
    with each client's support rows in the order its batch schedule visits them (plain tensors, lists and dicts)."""
    from fedmeta.client import model_for, train_schedule
    from fedmeta.config import build_config
    from fedmeta.data import build_dataset
    from fedmeta.federation import sample_cohort
    from fedmeta.meta import params_of
    from fedmeta.meta.algorithm import build_algorithm

    cfg = build_config({}, overrides + ["simulation.engine=sequential"])
    dataset = build_dataset(cfg.data, cfg.model.modalities)
    spec, algorithm, m = dataset.spec, build_algorithm(cfg), cfg.model
    cohorts = [sample_cohort(cfg, list(dataset.train_clients), rnd) for rnd in range(1, cfg.simulation.rounds)]  # R + 1 rounds
    clients, rows = {}, {}
    for r, cohort in enumerate(cohorts):
        for cid in cohort:
            data = dataset.client(cid)
            clients.setdefault(str(cid), {"x": dict(data.x), "y": data.y, "present": data.present, "n_support": data.n_support})
            rows[f"{r}:{cid}"] = train_schedule(cfg, data, r + 1, cid).flatten()
    return {
        "modalities": [{"name": s.name, "kind": s.kind, "shape": list(s.shape), "vocab_size": s.vocab_size} for s in spec.modalities],
        "task": spec.task, "num_classes": spec.num_classes, "output_dim": spec.output_dim,
        "model": {"embed_dim": m.embed_dim, "hidden_dim": m.hidden_dim, "fusion": m.fusion, "image_encoder": m.image_encoder},
        "theta0": params_of(model_for(cfg, spec)),
        "inner_lr": cfg.meta.inner_lr, "batch_size": cfg.meta.inner_batch_size,
        "betas": [algorithm.step_size(r + 1) for r in range(len(cohorts))],
        "cohorts": cohorts, "clients": clients, "rows": rows,
    }


def pfl_unavailable(python: str | None, overrides: list[str]) -> str | None:
    """Why the pfl row cannot run (one line), or None."""
    if not python:
        return "pfl: skipped (no --pfl-python: pfl-research runs from its own interpreter, see experiments/pfl_reptile.py)"
    if not PFL_SCRIPT.exists():
        return f"pfl: skipped ({PFL_SCRIPT} is not in this installation)"
    from fedmeta.config import BUILTIN_MODEL, build_config

    cfg = build_config({}, overrides)
    if (cfg.model.factory, cfg.meta.algorithm, cfg.meta.inner_optimizer, cfg.privacy.enabled) != (BUILTIN_MODEL, "reptile", "sgd", False):
        return "pfl: skipped (the pfl row runs the default model with Reptile, SGD inner steps and no DP)"
    try:
        proc = subprocess.run([python, "-c", "import pfl.algorithm, pfl.model.pytorch"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"pfl: skipped (--pfl-python {python}: cannot run it: {err})"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["exit code " + str(proc.returncode)])[-1]
        return f"pfl: skipped (--pfl-python {python} cannot import pfl: {last})"
    return None


def run_pfl(python: str, overrides: list[str], timeout: float) -> dict:
    """The pfl row: ``experiments/pfl_reptile.py`` in ``python`` on :func:`pfl_workload`; its report plus
    ``theta_max_abs_diff``, the largest |theta_pfl - theta_fedmeta| after the same rounds (fedmeta: the torch-loop row's)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="fedmeta-bench-pfl-") as tmp:
        workload, out = Path(tmp) / "workload.pt", Path(tmp) / "pfl.json"
        torch.save(pfl_workload(overrides), workload)
        root = str(PFL_SCRIPT.parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.run([python, str(PFL_SCRIPT), str(workload), str(out)], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
        report = json.loads(out.read_text())
        theta = torch.load(str(out) + ".theta.pt", weights_only=True)
    ref = run_torch_loop(overrides, time.perf_counter(), keep_theta=True)["theta"]
    report["theta_max_abs_diff"] = max(float((theta[k] - ref[k]).abs().max()) for k in ref)
    return report


def update_flops(overrides: list[str]) -> int:
    """FLOPs of one client update on the workload (``FlopCounterMode`` around ``train_client`` of one client)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedmeta.client import model_for, train_client
    from fedmeta.config import build_config
    from fedmeta.data import build_dataset
    from fedmeta.meta import params_of

    cfg = build_config({}, overrides + ["simulation.engine=sequential"])
    dataset = build_dataset(cfg.data, cfg.model.modalities)
    model = model_for(cfg, dataset.spec)
    cid = int(dataset.train_clients[0])
    counter = FlopCounterMode(display=False)
    with counter:
        train_client(model, params_of(model), dataset.client(cid), cfg, dataset.spec, 1, cid)
    return int(counter.get_total_flops())


def ceilings(clients: int, device: str = "cpu", repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a 2048² matmul and of ``torch.bmm`` [N, 16, 64] x [N, 64, 32] (the workload's first layer), one thread, best of ``repeats``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dev = torch.device(device)

    def best(fn, flops: float) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return flops / min(times) / 1e9

    try:
        a = torch.randn(2048, 2048, device=dev)
        x, w = torch.randn(clients, 16, 64, device=dev), torch.randn(clients, 64, 32, device=dev)
        reps = max(1, 20000 // clients)
        return {
            "matmul_2048_gflops": best(lambda: a @ a, 2 * 2048**3),
            "bmm_gflops": best(lambda: [torch.bmm(x, w) for _ in range(reps)], 2 * clients * 16 * 64 * 32 * reps),
        }
    finally:
        torch.set_num_threads(threads)


# -- the command ------------------------------------------------------------------------


def start_cluster(nodes: int):
    """A local ``nodes``-node Ray cluster (``ray.cluster_utils.Cluster``); returns (cluster, the PIDs it started)."""
    from ray.cluster_utils import Cluster

    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    per_node = max(1, (os.cpu_count() or 1) // nodes)
    before = set(_descendants(os.getpid()))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=per_node)
    cluster.wait_for_nodes()
    return cluster, before


def _descendants(root: int) -> list[int]:
    kids, todo, out = _children(), [root], []
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def stop_cluster(cluster, before: set[int]) -> None:
    """Stop the cluster, then SIGKILL (by PID) any process it started that is still alive."""
    import signal

    started = set(_descendants(os.getpid())) - before
    cluster.shutdown()
    deadline = time.time() + 15
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in started):
        time.sleep(0.2)
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bench(engines: list[str], clients: int, rounds: int, population: int, chunk_size: int | None = None, threads: int | None = None,
          timeout: float = 3600, workers: list[int] | None = None, cluster_nodes: int = 0, store: str | None = None,
          device: str | None = None, extra: list[str] | None = None, pfl_python: str | None = None) -> dict:
    """Run each engine (the vectorised one once per ``workers`` value) in a fresh subprocess; returns the JSON document.

    ``extra``: more ``key=value`` overrides after the workload's (``--set``: another model or dataset)."""
    overrides = bench_overrides(clients, rounds, population, chunk_size, store, device) + list(extra or [])
    workers = workers or [0]
    result: dict = {
        "workload": {"clients_per_round": clients, "rounds": rounds, "population": population, "overrides": overrides,
                     "model": "default", "store": store, **workload_settings()},
        "load_avg_before": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "engines": {},
    }
    ceilings_before = ceilings(clients, device if device and device.startswith("cuda") else "cpu")
    runs = []  # (name, engine, extra overrides)
    for engine in engines:
        if engine != "vectorized":
            runs.append((engine, engine, []))
            continue
        for w in workers:
            runs.append(("vectorized" if w == 0 else f"vectorized-w{w}", engine, [] if w == 0 else ["simulation.engine=vectorized", f"simulation.workers={w}"]))
    cluster = before = None
    if cluster_nodes and any(w for w in workers) and "vectorized" in engines:
        cluster, before = start_cluster(cluster_nodes)
        result["cluster"] = {"nodes": cluster_nodes, "cpus_per_node": max(1, (os.cpu_count() or 1) // cluster_nodes), "address": cluster.address}
    try:
        from fedmeta.progress import status

        for i, (name, engine, extra) in enumerate(runs, 1):
            if extra and cluster is not None:
                extra = extra + [f"simulation.ray_address={cluster.address}"]
            if engine == "pfl":
                why = pfl_unavailable(pfl_python, overrides)
                status(why or f"bench {i}/{len(runs)}: pfl ({pfl_python}), {rounds} rounds of {clients} clients")
                result["engines"][name] = {"skipped": why} if why else run_pfl(pfl_python, overrides, timeout)
                continue
            status(f"bench {i}/{len(runs)}: {name}, {rounds} rounds of {clients} clients (start-up included; a few minutes for flower)")
            result["engines"][name] = _run_one(engine, overrides + extra, threads, timeout)
    finally:
        if cluster is not None:
            stop_cluster(cluster, before)
    result["load_avg_after"] = list(os.getloadavg())
    after = ceilings(clients, device if device and device.startswith("cuda") else "cpu")
    result["ceilings_before"], result["ceilings_after"] = ceilings_before, after
    result["ceilings"] = {k: max(ceilings_before[k], after[k]) for k in after}  # the better of the two: what the machine can do
    flops = update_flops(overrides)
    result["flops_per_update"] = flops
    for r in result["engines"].values():
        if "updates_per_s" in r:
            r["gflops_per_s"] = r["updates_per_s"] * flops / 1e9
            r["matmul_fraction"] = r["gflops_per_s"] / result["ceilings"]["matmul_2048_gflops"]
            r["bmm_fraction"] = r["gflops_per_s"] / result["ceilings"]["bmm_gflops"]
    ups = {e: r["updates_per_s"] for e, r in result["engines"].items() if "updates_per_s" in r}
    if "vectorized" in ups:
        result["ratios"] = {f"vectorized/{e}": ups["vectorized"] / v for e, v in ups.items() if e != "vectorized" and not e.startswith("vectorized-w")}
        result["ratios"].update({f"{e}/vectorized": v / ups["vectorized"] for e, v in ups.items() if e.startswith("vectorized-w")})
    per_cpu = {e: r["updates_per_cpu_s"] for e, r in result["engines"].items() if r.get("updates_per_cpu_s")}
    if "vectorized" in per_cpu:  # the same on each process's own CPU time (steadier on a shared machine)
        result["cpu_ratios"] = {f"vectorized/{e}": per_cpu["vectorized"] / v for e, v in per_cpu.items() if e != "vectorized"}
    return result


def _run_one(engine: str, overrides: list[str], threads: int | None, timeout: float) -> dict:
    """One engine in a fresh subprocess (so peak memory does not mix); its report, or ``{"error": ...}``."""
    with tempfile.TemporaryDirectory(prefix=f"fedmeta-bench-{engine}-") as tmp:
        spec = {"engine": engine, "overrides": overrides, "out_dir": str(Path(tmp) / "run"), "threads": threads}
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "fedmeta.bench", "--worker", json.dumps(spec), str(report)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not report.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
        return json.loads(report.read_text())


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    w = result["workload"]
    settings = ", ".join(f"{k}={v}" for k, v in workload_settings().items())
    table = Table(title=f"{w['clients_per_round']} clients/round, {w['rounds']} timed rounds, population {w['population']}, {settings}")
    for col in ("engine", "updates/s", "upd/CPU-s", "GFLOP/s", "% bmm", "start-up s", "s/round", "peak RSS MB", "peak PSS MB", "peak anon MB", "vec. ×"):
        table.add_column(col, justify="left" if col == "engine" else "right", no_wrap=col == "engine")
    vec = result["engines"].get("vectorized", {}).get("updates_per_s")
    for engine, r in result["engines"].items():
        if "error" in r:
            table.add_row(engine, f"[red]failed: {r['error']}[/red]", "", "", "", "", "", "", "", "", "")
            continue
        if "skipped" in r:
            table.add_row(engine, r["skipped"], "", "", "", "", "", "", "", "", "")
            continue
        if vec is None or engine == "vectorized":
            ratio = ""
        elif engine.startswith("vectorized-w"):  # Ray workers: speed-up over the in-process engine
            ratio = f"{r['updates_per_s'] / vec:.2f}"
        else:  # another engine: how many times faster the vectorised engine is
            ratio = f"{vec / r['updates_per_s']:.1f}"
        per_cpu = r.get("updates_per_cpu_s")
        table.add_row(engine, f"{r['updates_per_s']:.1f}", "" if per_cpu is None else f"{per_cpu:.1f}", f"{r.get('gflops_per_s', 0):.2f}", f"{100 * r.get('bmm_fraction', 0):.1f}",
                      f"{r['startup_s']:.1f}", f"{r['round_s']:.3f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['peak_pss_mb']:.0f}", f"{r.get('peak_anon_mb', 0):.0f}", ratio)
    console = Console(width=max(100, Console().width))
    console.print(table)
    if any(e.startswith("vectorized-w") for e in result["engines"]):
        console.print("vec. ×: vectorized ÷ that engine; on vectorized-wN rows (N Ray workers): that row ÷ the in-process vectorized")
    if "ceilings" in result:
        c = result["ceilings"]
        console.print(f"one client update = {result['flops_per_update']:,} FLOPs (FlopCounterMode); ceilings measured in this run, one thread: "
                      f"matmul 2048² {c['matmul_2048_gflops']:.1f} GFLOP/s, bmm {c['bmm_gflops']:.1f} GFLOP/s (% bmm = achieved ÷ bmm; "
                      "the better of before and after the engines); upd/CPU-s: updates per second of the engine process's own CPU time")
    if result.get("cpu_ratios"):
        console.print("on CPU time: " + ", ".join(f"{k.replace('/', ' ÷ ')} {v:.2f}x" for k, v in result["cpu_ratios"].items()))
    pfl = result["engines"].get("pfl", {})
    if "theta_max_abs_diff" in pfl:
        console.print(f"pfl: theta after the same rounds differs from fedmeta's by at most {pfl['theta_max_abs_diff']:.2e}")
    console.print(f"load average before {result['load_avg_before'][0]:.2f}, after {result['load_avg_after'][0]:.2f} ({result['cpus']} CPUs)")


def cmd_bench(args: argparse.Namespace) -> int:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        print(f"fedmeta: --engines: must be a comma-separated subset of {','.join(ENGINES)} (got {args.engines!r})", file=sys.stderr)
        return 2
    for name in ("clients", "rounds"):
        if getattr(args, name) < 1:
            print(f"fedmeta: --{name}: must be >= 1 (got {getattr(args, name)})", file=sys.stderr)
            return 2
    workers, cluster, store = getattr(args, "workers", None) or [0], getattr(args, "cluster", 0), getattr(args, "store", None)
    if any(w < 0 for w in workers):
        print(f"fedmeta: --workers: must be >= 0 (got {workers})", file=sys.stderr)
        return 2
    if cluster < 0 or cluster == 1:
        print(f"fedmeta: --cluster: the number of Ray nodes, >= 2 (or 0: no cluster) (got {cluster})", file=sys.stderr)
        return 2
    if store:
        try:
            population = store_population(store)
        except (OSError, ValueError, KeyError) as err:
            print(f"fedmeta: --store {store}: not a readable store ({err})", file=sys.stderr)
            return 2
        if args.population and args.population != population:
            print(f"fedmeta: --population: the store holds {population} clients (got {args.population})", file=sys.stderr)
            return 2
    else:
        population = args.population or default_population(args.clients)
    if population < default_population(args.clients):
        print(f"fedmeta: --population: must be >= {default_population(args.clients)} for {args.clients} training clients per round (got {population})", file=sys.stderr)
        return 2
    extra = list(getattr(args, "set", None) or [])
    if extra:
        from fedmeta.config import ConfigError, build_config

        try:
            build_config({}, extra)
        except (ConfigError, ValueError) as err:
            print(f"fedmeta: --set: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
    device = getattr(args, "device", None)
    if device:
        from fedmeta.config import ConfigError, build_config

        try:
            build_config({}, [f"simulation.device={device}"])
        except ConfigError as err:
            print(f"fedmeta: --device: {str(err).split(': ', 2)[-1]}", file=sys.stderr)
            return 2
    result = bench(engines, args.clients, args.rounds, population, args.chunk_size, args.threads,
                   workers=workers, cluster_nodes=cluster, store=store, device=device, extra=extra,
                   pfl_python=getattr(args, "pfl_python", None))
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {args.json}")
    return 1 if any("error" in r for r in result["engines"].values()) else 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="compare the engines' throughput, start-up and peak memory on one workload")
    p.add_argument("--clients", type=int, default=100, help="clients per round (N)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (R); one warm-up and one final round are added")
    p.add_argument("--population", type=int, default=0, help="population size P (default: just enough training clients)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    p.add_argument("--json", metavar="FILE", help="write the measurements as JSON")
    p.add_argument("--chunk-size", type=int, default=None, help="vectorized: clients per vmap chunk (default: simulation.chunk_size)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the in-process engines (default: the engine's)")
    p.add_argument("--workers", type=int, nargs="+", default=[0], metavar="N",
                   help="vectorized: run once per value; 0 = in-process, N = N Ray actors (simulation.workers)")
    p.add_argument("--cluster", type=int, default=0, metavar="K",
                   help="start a local K-node Ray cluster that the runs with workers join (stopped at the end)")
    p.add_argument("--device", default=None, help="simulation.device for every engine (cpu, cuda, cuda:i, auto; default cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another config override after the workload's (repeatable), e.g. --set model.image_encoder=cnn")
    p.add_argument("--pfl-python", metavar="PY", default=None,
                   help="the interpreter of a venv with pfl-research 0.6 (and pydantic): adds the pfl row (experiments/pfl_reptile.py)")
    p.add_argument("--store", metavar="DIR", help="the population is this store (fedmeta partition --format store); sets --population")
    p.set_defaults(func=cmd_bench)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _spec = json.loads(sys.argv[2])
    _out = run_engine(_spec["engine"], _spec["overrides"], Path(_spec["out_dir"]), _spec.get("threads"))
    Path(sys.argv[3]).write_text(json.dumps(_out))
