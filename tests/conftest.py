import os

import pytest
import torch

# Small models run fastest single-threaded on the 2-core CI machine.
torch.set_num_threads(1)
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network beyond the package registries


@pytest.fixture
def small_cfg():
    from fedmeta.config import build_config

    def make(*overrides: str):
        base = [
            "data.num_clients=10",
            "data.examples_per_client=20",
            "simulation.clients_per_round=3",
            "simulation.rounds=3",
            "simulation.eval_every=1",
            "output.progress=false",
        ]
        return build_config(None, base + list(overrides))

    return make
