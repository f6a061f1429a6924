"""A tiny stateful method for the tests (a user's method would look the same): each client counts its visits in its
client state, and its update is theta + 0.01 * visits (pure, vmappable). Tests that need it as a user's module file
(``flwr run``) write :data:`SOURCE`, this file's own text."""

from pathlib import Path

import torch

from fedmeta.meta import MetaAlgorithm

SOURCE = Path(__file__).read_text()


class Visits(MetaAlgorithm):
    """Stateful: each client counts its visits; its update is theta + 0.01 * visits."""

    def init_client_state(self, theta):
        return {"visits": torch.zeros(())}

    def client_update(self, model, params, support, query, schedule, icfg, state):
        visits = state["visits"] + 1
        return {k: v + 0.01 * visits for k, v in params.items()}, {"train_loss": visits}, {"visits": visits}

    def step_size(self, server_round):
        return 1.0
