"""The vectorised engine across a Ray cluster: ``simulation.engine = "vectorized"`` with ``simulation.workers = N``.

A thin adapter, not a second engine. Each of N Ray actors holds a
:class:`~fedmeta.engines.vectorized.VectorizedBackend` over its *shard* of the
population (the clients with ``cid % N == i``: its :class:`ClientStore` only
ever builds or reads those) and runs the very same
:meth:`~VectorizedBackend.train_chunks` / :meth:`~VectorizedBackend.evaluate_chunks`
the single-process engine runs. What comes back is each chunk's stacked
per-client ``phi`` and metrics; :func:`~fedmeta.engines.vectorized.client_updates`
turns them into the per-client replies the round loop takes, in cohort order.
Sampling, screening, aggregation, DP clipping and noise (added once, here) and
accounting stay in :func:`fedmeta.federation.run_federation`, unchanged, which is
why θ equals the in-process engine's up to float rounding (tested to 1e-5).
A stateful method's client state stays on the driver too (its store, checkpointed with the run): each
call ships the sub-cohort's state rows with θ and takes the new rows back, so a worker holds no state
between rounds and a client's state does not depend on which worker trained it (tested to 1e-6).

Per-client results are what the server needs (server-mode DP clips each client's
update, robust aggregation sorts them), so each round moves
``clients x parameters x 4`` bytes from the workers to the driver (10,437 float32
parameters: about 42 kB a client, 420 MB for 10,000 clients) plus θ once to each
worker (through Ray's object store).

Placement: one actor per CPU slot (``num_cpus=1``), spread over the nodes; with
``simulation.device = "cuda"`` (or ``"auto"`` on a cluster with at least N GPUs)
one GPU each (``num_gpus=1``; Ray sets ``CUDA_VISIBLE_DEVICES``, so the actor uses
``cuda``). ``simulation.ray_address``: ``""`` starts a private local Ray instance
(stopped at the end), ``"auto"`` / ``"host:port"`` joins a running cluster (left
running). Each actor builds its dataset from the config (``build_dataset``), so
datasets and user components must be importable on every node: the driver passes
its ``PYTHONPATH`` (with the directory holding ``fedmeta`` and the current
directory) to the workers, and a store (``data.dataset = "store"``) must be at
``data.path`` on every node (shared storage, or a copy per node).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedmeta.config import Config, config_from_json
from fedmeta.federation import Params, Replies, RunError
from fedmeta.meta.client_state import ClientStates, CohortRows

log = logging.getLogger("fedmeta")


class ShardWorker:
    """The body of one Ray actor: a VectorizedBackend over the clients it is sent (its shard)."""

    def __init__(self, cfg_json: str, gpu: bool) -> None:
        cfg = config_from_json(cfg_json)
        if gpu:  # Ray made exactly one GPU visible to this actor
            cfg = cfg.model_copy(update={"simulation": cfg.simulation.model_copy(update={"device": "cuda"})})
        from fedmeta.components import resolve_components
        from fedmeta.engines.vectorized import VectorizedBackend

        self.backend = VectorizedBackend(cfg, resolve_components(cfg, with_engine=False))  # this process's components, once

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node": ctx.get_node_id(), "device": str(self.backend.device),
                "gpus": ray.get_gpu_ids() if hasattr(ray, "get_gpu_ids") else []}

    def train_chunks(self, theta: Params, cids: list[int], server_round: int, state: Params | None = None):
        """The sub-cohort's chunks; with ``state`` (a stateful method: the driver's rows of ``cids``, ``[C, *shape]``
        per key) also the new rows, as ``(chunks, rows)``: the worker holds no client state between calls."""
        if state is None:
            return self.backend.train_chunks(theta, cids, server_round)
        rows = CohortRows(cids, state)
        self.backend.client_states = rows
        return self.backend.train_chunks(theta, cids, server_round), rows.rows

    def evaluate_chunks(self, theta: Params, cids: list[int], server_round: int):
        return self.backend.evaluate_chunks(theta, cids, server_round)

    def prefetch(self, cids: list[int]) -> int:
        """Build this worker's shard ahead of the rounds (``fedmeta bench``); returns how many clients it holds."""
        self.backend.prefetch(cids)
        return self.stored_clients()

    def stored_clients(self) -> int:
        """How many clients this actor's store holds (its shard, or what of it was sampled so far)."""
        return int(self.backend.store.built.sum())


def worker_pythonpath() -> str:
    """What the workers need on their path: the directory holding this ``fedmeta``, the current directory, ``PYTHONPATH``."""
    parts = [str(Path(__file__).resolve().parents[2]), os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(p for p in parts if p))


def connect(address: str) -> bool:
    """Join ``address`` (``"auto"``, ``host:port``), or start a private local Ray (``""``); True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env = {"env_vars": {"PYTHONPATH": worker_pythonpath()}}
    common = {"runtime_env": env, "logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # address="local": always a new instance, even where `ray start` left a cluster that ray.init() would join
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **common)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at simulation.ray_address={address!r}" if address else "a local Ray instance"
        raise RunError(f"cannot start or join {where}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    return True


def actor_resources(device: str, workers: int, cluster_gpus: float) -> dict[str, float]:
    """Ray resources of one worker: a CPU slot, plus one whole GPU with ``device = "cuda[:i]"``
    (or ``"auto"`` when the cluster has a GPU for every worker)."""
    if device.startswith("cuda"):
        if cluster_gpus < workers:
            raise RunError(f"simulation.device={device!r} with simulation.workers={workers}: one GPU per worker, but the Ray cluster has {cluster_gpus:g}")
        return {"num_cpus": 1, "num_gpus": 1}
    if device == "auto" and cluster_gpus >= workers:
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": 1, "num_gpus": 0}


class RayVectorizedBackend:
    """The Backend of ``engine = "vectorized"`` with ``workers = N > 0`` (see the module docstring)."""

    name = "vectorized"

    def __init__(self, cfg: Config, components) -> None:
        """``components``: the run's :class:`~fedmeta.components.Components` (the workers rebuild theirs from ``cfg``)."""
        import ray

        from fedmeta.client import configure_torch
        from fedmeta.engines.vectorized import THREADS

        configure_torch(THREADS)  # the driver screens and aggregates, as the in-process engine does, with its threads
        self.cfg = cfg
        self.dataset = components.dataset()
        self.algorithm = components.algorithm
        self.workers = cfg.simulation.workers
        self.timeout = cfg.simulation.round_timeout
        # a stateful method's client state: held here, on the driver (checkpointed with the run); each worker gets
        # its sub-cohort's rows with the call and returns the new rows (ShardWorker.train_chunks)
        self.client_states = ClientStates(self.algorithm)
        self.started_ray = connect(cfg.simulation.ray_address)
        try:
            have = ray.cluster_resources()
            if have.get("CPU", 0) < self.workers:
                raise RunError(f"simulation.workers={self.workers}: one CPU slot per worker, but the Ray cluster has {have.get('CPU', 0):g}")
            resources = actor_resources(cfg.simulation.device, self.workers, have.get("GPU", 0))
        except RunError:
            self.close()
            raise
        self.gpu = resources["num_gpus"] > 0
        actor = ray.remote(**resources)(ShardWorker)
        cfg_json = cfg.model_dump_json()
        self.actors = [actor.options(scheduling_strategy="SPREAD").remote(cfg_json, self.gpu) for _ in range(self.workers)]
        try:
            self.placement = ray.get([a.where.remote() for a in self.actors], timeout=max(self.timeout, 300.0))
        except Exception as err:  # noqa: BLE001 - one line for whatever Ray says (no resources, import error in a worker...)
            self.close()
            raise RunError(f"simulation.workers={self.workers}: the Ray workers did not start: {_first_line(err)}") from None
        nodes = len({p["node"] for p in self.placement})
        log.info("vectorized engine on %d Ray workers over %d node(s)%s", self.workers, nodes, " (one GPU each)" if self.gpu else "")

    def populations(self) -> tuple[list[int], list[int]]:
        return list(self.dataset.train_clients), list(self.dataset.heldout_clients)

    def validation_population(self) -> list[int]:
        """The dataset's validation clients, if it has any (the optional ``validation_clients``), as the in-process engine."""
        return list(getattr(self.dataset, "validation_clients", None) or [])

    def prefetch(self, cids: list[int] | None = None) -> None:
        """Each worker builds its shard of ``cids`` (default: the whole population) ahead of the rounds."""
        import ray

        cids = list(range(int(self.dataset.num_clients))) if cids is None else list(cids)
        ray.get([a.prefetch.remote([cids[p] for p in pos]) for a, pos in zip(self.actors, self._shards(cids))])

    def _shards(self, cids: list[int]) -> list[list[int]]:
        """Cohort positions per worker: client ``cid`` lives on worker ``cid % N``."""
        shards: list[list[int]] = [[] for _ in self.actors]
        for p, cid in enumerate(cids):
            shards[int(cid) % self.workers].append(p)
        return shards

    def _run(self, method: str, theta: Params, cids: list[int], server_round: int) -> list:
        import ray

        theta_ref = ray.put(theta)
        shards = self._shards(cids)
        stateful = method == "train_chunks" and self.client_states.algorithm.stateful
        calls = []
        for a, pos in zip(self.actors, shards):
            if pos:
                sub = [cids[p] for p in pos]
                extra = (self.client_states.gather(sub, theta),) if stateful else ()
                calls.append((pos, getattr(a, method).remote(theta_ref, sub, server_round, *extra)))
        try:
            results = ray.get([ref for _, ref in calls], timeout=self.timeout)
        except Exception as err:  # noqa: BLE001 - a worker's error (or death, or the timeout) ends the run with one line
            raise RunError(f"round {server_round}: a Ray worker failed: {_first_line(err)}") from None
        if stateful:  # every worker answered: keep the new rows
            for (pos, _), (_, rows) in zip(calls, results):
                self.client_states.scatter([cids[p] for p in pos], rows)
            results = [worker_chunks for worker_chunks, _ in results]
        chunks = []
        for (pos, _), worker_chunks in zip(calls, results):
            for ch in worker_chunks:  # positions within the worker's sub-cohort -> positions in the cohort
                ch.positions = [pos[j] for j in ch.positions]
                chunks.append(ch)
        return chunks

    def train(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        from fedmeta.engines.vectorized import cohort_updates

        return Replies(results=cohort_updates(self.cfg, theta, cids, self._run("train_chunks", theta, cids, server_round)))

    def evaluate(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        from fedmeta.engines.vectorized import eval_results

        return Replies(results=eval_results(cids, self._run("evaluate_chunks", theta, cids, server_round)))

    def close(self) -> None:
        """Stop the actors, and Ray itself if this backend started it."""
        import ray

        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort at the end of a run
                pass
        self.actors = []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
            self.started_ray = False


def _first_line(err: BaseException) -> str:
    """The most telling line of a Ray error (the worker's own exception, if it carries one)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and str(cause).strip():
        err = cause
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = next((ln for ln in reversed(lines) if ln.startswith(("RunError", "DataError", "ConfigError", "ModuleNotFoundError"))), lines[0] if lines else type(err).__name__)
    return f"{type(err).__name__}: {text}"[:400] if not text.startswith(type(err).__name__) else text[:400]

