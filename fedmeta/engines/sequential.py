"""The sequential engine's backend: a plain Python loop over the cohort's clients, in process.

It is the reference the other engines are checked against, and the
"sequential" column of ``fedmeta bench``.
"""

from __future__ import annotations

from fedmeta.config import Config
from fedmeta.data.base import validation_clients
from fedmeta.client import configure_torch, evaluate_client, model_for, train_client_state
from fedmeta.federation import ClientUpdate, Params, Replies
from fedmeta.components import components_of
from fedmeta.engines.base import InProcessEngine
from fedmeta.meta.algorithm import ClientStates
from fedmeta.registry import ENGINES


class SequentialBackend:
    name = "sequential"

    def __init__(self, cfg: Config, components) -> None:
        """``components``: the run's :class:`~fedmeta.components.Components` (or a built dataset: ``cfg``'s components around it)."""
        configure_torch(1)
        components = components_of(cfg, components)
        self.cfg = cfg
        self.algorithm = components.algorithm
        self.dataset = components.dataset()
        self.spec = self.dataset.spec
        self.model = model_for(cfg, self.spec, components)
        self.client_states = ClientStates(self.algorithm)  # a stateful method's per-client state

    def populations(self) -> tuple[list[int], list[int]]:
        return list(self.dataset.train_clients), list(self.dataset.heldout_clients)

    def validation_population(self) -> list[int]:
        return validation_clients(self.dataset)

    def train(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        out = Replies()
        for cid in cids:
            state = self.client_states.get(cid, theta)
            phi, metrics, state = train_client_state(self.model, theta, self.dataset.client(cid), self.cfg, self.spec, server_round, cid, state,
                                                     self.algorithm)
            self.client_states.put(cid, state)
            out.results.append(ClientUpdate(cid, phi, int(metrics["num-examples"]), metrics))
        return out

    def evaluate(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        out = Replies()
        for cid in cids:
            out.results.append((cid, evaluate_client(self.model, theta, self.dataset.client(cid), self.cfg, self.spec, server_round, cid,
                                                                self.algorithm)))
        return out


@ENGINES.register("sequential")
class SequentialEngine(InProcessEngine):
    """``simulation.engine = "sequential"``: :class:`SequentialBackend` under the shared round loop."""

    def backend(self, cfg: Config, components) -> SequentialBackend:
        return SequentialBackend(cfg, components)
