"""Flower's Simulation Engine (Ray backend) driven in-process by ``fedmeta simulate``."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from fedmeta.config import Config
from fedmeta.engines.loop import RunError


def simulate_flower(cfg: Config, out_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the ServerApp and ClientApp on Flower's Simulation Engine; one SuperNode per client."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app

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
