"""Flower as a backend: the round loop over a Flower ``Grid``, and the Simulation Engine driver.

:class:`FlowerBackend` runs clients by sending Flower messages (built and
validated by :class:`fedmeta.engines.messages.MetaStrategy`); :func:`serve` is
what a ServerApp's ``main`` runs; :func:`simulate_flower` runs the project's
Flower App (its ServerApp and ClientApp, named by their component references
as in ``pyproject.toml``'s ``[tool.flwr.app.components]``) on Flower's
Simulation Engine, as ``flwr run`` would, without importing ``server/`` or
``clients/`` statically: the library does not depend on its adapters.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.config import Config
from fedmeta.data.base import DataError, spec_to_dict
from fedmeta.client import configure_torch, model_for
from fedmeta.federation import Params, Replies, RunError, run_federation
from fedmeta.engines.messages import MetaStrategy
from fedmeta.meta.algorithm import initial_meta_parameters
from fedmeta.progress import round_printer, status
from fedmeta.results import RunDirError, RunWriter, check_resume, close_writers, default_out_dir, prepare_out_dir, run_dir_lock

log = logging.getLogger("fedmeta.server")
CLIENT_APP = "clients.app:app"  # the Flower App's ClientApp component ([tool.flwr.app.components])


class FlowerBackend:
    """Runs clients by sending Flower messages through a ``Grid``."""

    name = "flower"

    def __init__(self, grid: Grid, cfg: Config) -> None:
        self.grid = grid
        self.cfg = cfg
        self.strategy = MetaStrategy(cfg)
        self.strategy.stop_on_data_error = simulated_grid(grid)  # docs/design.md, "A node's invalid data"
        self.node_of: dict[int, int] = {}
        self.train_pop: list[int] = []
        self.heldout_pop: list[int] = []
        self.validation_pop: list[int] = []
        self.spec = None
        self.discovery_rejected: list[str] = []  # counted as rejected in the first round this process runs
        self.nodes_found = 0  # SuperNodes connected at discovery

    def discover(self, expected: int, wait_s: float, require_all: bool = False) -> None:
        """Ask every node which client it holds (a stock Flower client that can't answer trains under its node id).

        A malformed description (see :meth:`MetaStrategy.parse_query`), a data spec other than the one most
        nodes announce, or a partition id claimed by several nodes excludes the node(s): logged here and
        counted as ``rejected`` in the first round. The size a node announces caps its weight later.
        ``require_all``: refuse (:func:`check_node_count`) unless exactly ``data.num_clients`` nodes connected.
        """
        deadline = time.time() + wait_s
        nodes = list(self.grid.get_node_ids())
        if len(nodes) < expected and self.cfg.output.progress:
            status(f"waiting for the SuperNodes to connect: {len(nodes)} of {expected} so far (up to {wait_s:.0f} s)")
        while len(nodes) < expected and time.time() < deadline:
            time.sleep(0.5)
            nodes = list(self.grid.get_node_ids())
        self.nodes_found = len(nodes)
        if require_all:  # before any message: a run on the wrong number of nodes never starts
            check_node_count(self.nodes_found, self.cfg)
        queries = self.strategy.configure_query(nodes)
        answers = list(self.grid.send_and_receive(queries, timeout=self.cfg.simulation.round_timeout))
        origin = {m.metadata.message_id: m.metadata.dst_node_id for m in queries}
        replies = {origin.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m for m in answers}
        described: dict[int, dict] = {}
        for node in sorted(nodes):
            if node not in replies:
                continue
            try:
                info = self.strategy.parse_query(replies[node])
            except DataError as err:  # simulation: the run's own data config is wrong; stop with the client's line
                if self.strategy.stop_on_data_error:
                    raise
                self._reject(node, f"its data are invalid: {err}")
                continue
            except Exception as err:  # noqa: BLE001 - one node's answer never stops the run
                self._reject(node, str(err) if isinstance(err, ValueError) else f"unreadable ({type(err).__name__})")
                continue
            if info is None:  # answered with an error: no query handler (stock client) or no data
                log.warning("node %s did not describe itself; treating it as a training client", node)
                self.node_of[node] = node
                self.train_pop.append(node)
            else:
                described[node] = info
        keys = {node: json.dumps(spec_to_dict(i["spec"]), sort_keys=True) for node, i in described.items() if i["spec"] is not None}
        spec_key, spec_votes = Counter(keys.values()).most_common(1)[0] if keys else (None, 0)
        for node in [n for n, k in keys.items() if k != spec_key]:
            self._reject(node, f"its data spec differs from the one {spec_votes} nodes announced")
            del described[node]
        claims = Counter(i["partition-id"] for i in described.values())
        for node, info in described.items():
            cid = info["partition-id"]
            if claims[cid] > 1:
                self._reject(node, f"partition-id {cid} is claimed by {claims[cid]} nodes; none of them is used")
                continue
            self.node_of[cid] = node
            {"train": self.train_pop, "validation": self.validation_pop, "test": self.heldout_pop}[info["group"]].append(cid)
            if info["num-examples"] is not None:
                self.strategy.announced[node] = info["num-examples"]
            if self.spec is None and info["spec"] is not None:
                self.spec = info["spec"]
        self.train_pop.sort()
        self.heldout_pop.sort()
        self.validation_pop.sort()

    def _reject(self, node: int, why: str) -> None:
        reason = f"discovery: node {node}: {why}"
        log.warning("rejected %s", reason)
        self.discovery_rejected.append(reason)

    def populations(self) -> tuple[list[int], list[int]]:
        return self.train_pop, self.heldout_pop

    def validation_population(self) -> list[int]:
        return self.validation_pop

    def _targets(self, cids: list[int]) -> list[tuple[int, int]]:
        return [(c, self.node_of[c]) for c in cids if c in self.node_of]

    def train(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        targets = self._targets(cids)
        msgs = self.strategy.configure_train(theta, targets, server_round)
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.simulation.round_timeout))
        out = self.strategy.parse_train(theta, {n: c for c, n in targets}, replies, msgs)
        out.rejected[:0], self.discovery_rejected = self.discovery_rejected, []
        return out

    def evaluate(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        targets = self._targets(cids)
        msgs = self.strategy.configure_evaluate(theta, targets, server_round)
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.simulation.round_timeout))
        return self.strategy.parse_evaluate({n: c for c, n in targets}, replies, msgs)


def simulated_grid(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's Simulation Engine's (an ``InMemoryGrid``: every node's data come from this run's config)."""
    return any(c.__name__ == "InMemoryGrid" for c in type(grid).__mro__)


def check_node_count(found: int, cfg: Config) -> None:
    """Refuse a federation whose SuperNode count is not ``data.num_clients`` (one SuperNode per client).

    ``flwr run .`` without a SuperNode count simulates a handful of nodes: the run would train on a few
    clients, with no held-out ones, while config.json claims the configured population.
    """
    n = cfg.data.num_clients
    if found != n:
        raise RunError(
            f"data.num_clients: is {n}, but {found} SuperNode(s) connected (one per client is needed); "
            f"run `flwr run . --federation-config \"num-supernodes={n}\"` (or start {n} SuperNodes), or set data.num_clients={found}"
        )


def serve(grid: Grid, cfg: Config, out_dir: str | Path | None = None, resume: bool | None = None, progress: bool | None = None,
          launched_at: float | None = None, components=None) -> dict[str, Any]:
    """Discover the nodes, then run the federation; returns the run summary.

    ``components``: the run's :class:`~fedmeta.components.Components`; None resolves ``cfg``'s (a deployed ServerApp's top;
    it is the engine, so none is resolved).
    """
    if components is None:
        from fedmeta.components import resolve_components

        components = resolve_components(cfg, with_engine=False)
    launched_at = time.time() if launched_at is None else launched_at
    configure_torch(1)
    out = Path(out_dir or cfg.output.dir or default_out_dir())
    resume = cfg.output.resume if resume is None else resume
    with run_dir_lock(out, "output.dir", create=not resume):  # one process per run directory (re-entrant in-process)
        return _serve(grid, cfg, out, resume, progress, launched_at, components)


def _serve(grid: Grid, cfg: Config, out: Path, resume: bool, progress: bool | None, launched_at: float, components) -> dict[str, Any]:
    if resume:  # the same rules as `fedmeta simulate --resume` (fedmeta/results.py::check_resume), before discovery
        check_resume(out, cfg, option="output.dir")
    else:
        prepare_out_dir(out, option="output.dir", hint="set output.resume=true to continue it, or choose another output.dir")
    backend = FlowerBackend(grid, cfg)
    show_progress = cfg.output.progress if progress is None else progress
    if show_progress:
        status(f"discovering {cfg.data.num_clients} SuperNodes (each describes its client)")
    backend.discover(expected=cfg.data.num_clients, wait_s=min(cfg.simulation.round_timeout, 120.0), require_all=True)
    if not backend.train_pop:
        raise RunError("no training clients answered; check the SuperNodes' logs")
    spec = backend.spec or components.dataset().spec
    theta0 = initial_meta_parameters(model_for(cfg, spec, components), components.algorithm)
    chance = 1.0 / spec.num_classes if spec.task == "classification" and spec.num_classes > 0 else None
    show = round_printer(cfg.simulation.rounds, chance=chance) if show_progress else None
    if show_progress:
        status(f"{'resuming' if resume else 'starting'} {cfg.simulation.rounds} rounds of {cfg.meta.algorithm} into {out}")
    try:
        return run_federation(cfg, backend, theta0, RunWriter(out), resume=resume, progress=show, launched_at=launched_at,
                              algorithm=components.algorithm)
    finally:
        if show is not None:
            show.close()


def make_server_app(cfg: Config, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True, result: dict | None = None,
                    launched_at: float | None = None, components=None) -> ServerApp:
    """A ServerApp bound to a config (what ``fedmeta simulate`` runs)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            summary = serve(grid, cfg, out_dir, resume, progress, launched_at=launched_at, components=components)
        except (RunDirError, RunError, DataError) as err:  # e.g. a full disk, a bad client: the caller reports one line
            if result is None:
                raise
            result["__error__"] = err
            return
        if result is not None:
            result.update(summary)

    return server_app


def load_component(ref: str):
    """``"module:attr"`` -> the object, as Flower resolves app components."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _shutdown_ray() -> None:
    """Stop the Ray runtime this process started (Flower normally does; not when interrupted early)."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort while exiting on Ctrl-C
        log.debug("ray.shutdown() failed", exc_info=True)


def ray_backend_config(cfg: Config) -> dict[str, Any]:
    """The Simulation Engine's Ray backend config: client resources, and which Ray to use.

    ``simulation.num_gpus_per_client``: each ClientApp's GPU share (Ray places at most ``1 / share``
    clients on a GPU at once). ``simulation.ray_address``: ``""`` starts a private local Ray instance with
    every local CPU (GPUs are detected by Ray); ``"auto"`` / ``"host:port"`` / ``"ray://host:port"`` joins
    a running cluster (whose size is then the cluster's: ``ray.init`` refuses ``num_cpus`` when joining).
    """
    common = {"logging_level": logging.ERROR, "log_to_driver": False}
    if cfg.simulation.ray_address:
        init_args = {"address": cfg.simulation.ray_address, **common}
    else:
        # address="local": a new instance even where `ray start` (or RAY_ADDRESS) names a cluster ray.init() would join
        init_args = {"address": "local", "num_cpus": os.cpu_count() or 1, "include_dashboard": False, **common}
    return {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus_per_client, "num_gpus": cfg.simulation.num_gpus_per_client},
        "init_args": init_args,
    }


class _NotForTheUser(logging.Filter):
    """Drops Flower's deprecation warning about ``run_simulation``: fedmeta calls it, the user cannot act on it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).lstrip().startswith("DEPRECATED FEATURE") and "run_simulation" in str(record.args))


def simulate_flower(cfg: Config, out_dir: Path, resume: bool = False, progress: bool = True, launched_at: float | None = None,
                    components=None) -> dict[str, Any]:
    """Run the ServerApp and ClientApp on Flower's Simulation Engine; one SuperNode per client.

    The ServerApp (in this process) uses ``components``; each ClientApp (a Ray actor) resolves its own from the config.
    """
    launched_at = time.time() if launched_at is None else launched_at
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # never `uv sync` a per-run environment (it would pull a CUDA torch): the app runs in this environment
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    if progress:
        status(f"starting Flower's Simulation Engine: Ray with {cfg.data.num_clients} SuperNodes (start-up takes a while)")
    from flwr.simulation import run_simulation

    client_app = load_component(CLIENT_APP)
    result: dict[str, Any] = {}
    server_app = make_server_app(cfg, out_dir, resume=resume, progress=progress, result=result, launched_at=launched_at, components=components)
    backend_config = ray_backend_config(cfg)
    # Ctrl-C: Flower's ServerApp runs in a non-daemon thread that would wait (up to round_timeout per round) for
    # replies that never come once the Simulation Engine stops, and could log the round in flight as failed.
    # So on SIGINT the run directory is closed first (nothing more is written: the checkpoint stays at the last
    # completed round), Ray is shut down, and KeyboardInterrupt propagates (the CLI then exits without joining).
    in_main = threading.current_thread() is threading.main_thread()
    previous = None

    flwr_log = logging.getLogger("flwr")
    flwr_level = flwr_log.level
    not_for_the_user = _NotForTheUser()
    flwr_log.addFilter(not_for_the_user)

    def on_sigint(signum, frame):
        close_writers(out_dir)
        flwr_log.setLevel(logging.CRITICAL + 1)  # the actors' expected deaths during teardown are not news
        raise KeyboardInterrupt

    if in_main:
        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.data.num_clients, backend_config=backend_config)
    except KeyboardInterrupt:
        close_writers(out_dir)
        _shutdown_ray()
        raise
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGINT, previous)
        flwr_log.setLevel(flwr_level)
        flwr_log.removeFilter(not_for_the_user)
    if "__error__" in result:
        raise result["__error__"]
    if not result:
        raise RunError("the Flower simulation ended without a result; see the log above")
    return result
