"""The sequential engine's backend: a plain Python loop over the cohort's clients, in process.

It is the reference the other engines are checked against, and the
"sequential" column of ``fedmeta bench``.
"""

from __future__ import annotations

from fedmeta.config import Config
from fedmeta.data.base import validation_clients
from fedmeta.client import configure_torch, evaluate_client, model_for, train_client_state
from fedmeta.federation import ClientUpdate, Params, Replies
from fedmeta.meta.algorithm import ClientStates, algorithm_for


class SequentialBackend:
    name = "sequential"

    def __init__(self, cfg: Config, dataset) -> None:
        configure_torch(1)
        self.cfg = cfg
        self.dataset = dataset
        self.spec = dataset.spec
        self.model = model_for(cfg, self.spec)
        self.client_states = ClientStates(algorithm_for(cfg))  # a stateful method's per-client state

    def populations(self) -> tuple[list[int], list[int]]:
        return list(self.dataset.train_clients), list(self.dataset.heldout_clients)

    def validation_population(self) -> list[int]:
        return validation_clients(self.dataset)

    def train(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        out = Replies()
        for cid in cids:
            state = self.client_states.get(cid, theta)
            phi, metrics, state = train_client_state(self.model, theta, self.dataset.client(cid), self.cfg, self.spec, server_round, cid, state)
            self.client_states.put(cid, state)
            out.results.append(ClientUpdate(cid, phi, int(metrics["num-examples"]), metrics))
        return out

    def evaluate(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        out = Replies()
        for cid in cids:
            out.results.append((cid, evaluate_client(self.model, theta, self.dataset.client(cid), self.cfg, self.spec, server_round, cid)))
        return out
