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
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.config import Config
from fedmeta.data import build_dataset
from fedmeta.data.base import spec_from_dict
from fedmeta.client import configure_torch, model_for
from fedmeta.federation import Params, Replies, RunError, run_federation
from fedmeta.engines.messages import MetaStrategy
from fedmeta.meta.algorithm import algorithm_for, initial_meta_parameters
from fedmeta.progress import round_printer
from fedmeta.results import RunWriter, default_out_dir

log = logging.getLogger("fedmeta.server")
CLIENT_APP = "clients.app:app"  # the Flower App's ClientApp component ([tool.flwr.app.components])


class FlowerBackend:
    """Runs clients by sending Flower messages through a ``Grid``."""

    name = "flower"

    def __init__(self, grid: Grid, cfg: Config) -> None:
        self.grid = grid
        self.cfg = cfg
        self.strategy = MetaStrategy(cfg)
        self.node_of: dict[int, int] = {}
        self.train_pop: list[int] = []
        self.heldout_pop: list[int] = []
        self.spec = None

    def discover(self, expected: int, wait_s: float) -> None:
        """Ask every node which client it holds (a stock Flower client that can't answer trains under its node id)."""
        deadline = time.time() + wait_s
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < expected and time.time() < deadline:
            time.sleep(0.5)
            nodes = list(self.grid.get_node_ids())
        queries = self.strategy.configure_query(nodes)
        answers = list(self.grid.send_and_receive(queries, timeout=self.cfg.simulation.round_timeout))
        origin = {m.metadata.message_id: m.metadata.dst_node_id for m in queries}
        replies = {origin.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m for m in answers}
        for node in sorted(nodes):
            info = self.strategy.parse_query(replies[node]) if node in replies else None
            if info is None:
                if node in replies:  # answered with an error: no query handler (stock client) or no data
                    log.warning("node %s did not describe itself; treating it as a training client", node)
                    self.node_of[node] = node
                    self.train_pop.append(node)
                continue
            cid = int(info["partition-id"])
            if cid in self.node_of:
                log.warning("nodes %s and %s both hold client %s; using the first", self.node_of[cid], node, cid)
                continue
            self.node_of[cid] = node
            (self.heldout_pop if info.get("heldout") else self.train_pop).append(cid)
            if self.spec is None and "spec" in info:
                self.spec = spec_from_dict(info["spec"])
        self.train_pop.sort()
        self.heldout_pop.sort()

    def populations(self) -> tuple[list[int], list[int]]:
        return self.train_pop, self.heldout_pop

    def _targets(self, cids: list[int]) -> list[tuple[int, int]]:
        return [(c, self.node_of[c]) for c in cids if c in self.node_of]

    def train(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        targets = self._targets(cids)
        msgs = self.strategy.configure_train(theta, targets, server_round)
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.simulation.round_timeout))
        return self.strategy.parse_train(theta, {n: c for c, n in targets}, replies, msgs)

    def evaluate(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        targets = self._targets(cids)
        msgs = self.strategy.configure_evaluate(theta, targets, server_round)
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.simulation.round_timeout))
        return self.strategy.parse_evaluate({n: c for c, n in targets}, replies, msgs)


def serve(grid: Grid, cfg: Config, out_dir: str | Path | None = None, resume: bool | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Discover the nodes, then run the federation; returns the run summary."""
    configure_torch(1)
    out = Path(out_dir or cfg.output.dir or default_out_dir())
    backend = FlowerBackend(grid, cfg)
    backend.discover(expected=cfg.data.num_clients, wait_s=min(cfg.simulation.round_timeout, 120.0))
    if not backend.train_pop:
        raise RunError("no training clients answered; check the SuperNodes' logs")
    spec = backend.spec or build_dataset(cfg.data, cfg.model.modalities).spec
    theta0 = initial_meta_parameters(model_for(cfg, spec), algorithm_for(cfg))
    show = round_printer(cfg.simulation.rounds) if (cfg.output.progress if progress is None else progress) else None
    return run_federation(cfg, backend, theta0, RunWriter(out), resume=cfg.output.resume if resume is None else resume, progress=show)


def make_server_app(cfg: Config, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True, result: dict | None = None) -> ServerApp:
    """A ServerApp bound to a config (what ``fedmeta simulate`` runs)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        summary = serve(grid, cfg, out_dir, resume, progress)
        if result is not None:
            result.update(summary)

    return server_app


def load_component(ref: str):
    """``"module:attr"`` -> the object, as Flower resolves app components."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def simulate_flower(cfg: Config, out_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the ServerApp and ClientApp on Flower's Simulation Engine; one SuperNode per client."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    client_app = load_component(CLIENT_APP)
    result: dict[str, Any] = {}
    server_app = make_server_app(cfg, out_dir, resume=resume, progress=progress, result=result)
    backend_config = {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.data.num_clients, backend_config=backend_config)
    if not result:
        raise RunError("the Flower simulation ended without a result; see the log above")
    return result
