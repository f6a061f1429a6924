"""A user's own federated dataset: a synthetic population of few-shot classification tasks.

Each client draws its class prototypes from a shared set plus a private shift
(so a good shared initialisation exists, but every client still needs to
adapt), and ``y``-balanced examples around them. Clients are built lazily,
only when ``client(cid)`` is called, from a seed derived from
``data.seed`` and the client id: a Flower SuperNode builds its own client and
nothing else, and every process builds the same data for the same id.

fedmeta calls ``make(cfg)`` with the ``[data]`` section of the config
(:class:`fedmeta.config.DataConfig`) and uses the protocol attributes
``spec``, ``num_clients``, ``train_clients``, ``heldout_clients`` and
``client(cid)`` (:class:`fedmeta.data.FederatedDataset`).
"""

from __future__ import annotations

import numpy as np
import torch

from fedmeta.config import DataConfig
from fedmeta.data import ClientData, DatasetSpec, ModalitySpec, split_clients

FEATURES = 8  # feature dimension of the one modality
SHIFT = 1.5  # how far a client's prototypes move from the shared ones
NOISE = 1.2  # within-class spread


class PrototypePopulation:
    """``num_clients`` clients of ``examples_per_client`` rows each; the first ``support_fraction`` are the support set."""

    def __init__(self, num_clients: int, examples_per_client: int, num_classes: int, support_fraction: float, heldout_fraction: float, seed: int) -> None:
        self.spec = DatasetSpec(modalities=(ModalitySpec("features", "vector", (FEATURES,)),), task="classification", num_classes=num_classes)
        self.num_clients = num_clients
        self.examples_per_client = examples_per_client
        self.n_support = min(max(1, round(support_fraction * examples_per_client)), examples_per_client - 1)
        self.seed = seed
        split = split_clients(num_clients, heldout_fraction, seed)
        self.train_clients, self.heldout_clients = split.train, split.heldout
        self.prototypes = np.random.default_rng([seed, 0]).normal(0.0, 1.5, size=(num_classes, FEATURES))

    def client(self, cid: int) -> ClientData:
        rng = np.random.default_rng([self.seed, 1, cid])
        k, n = self.spec.num_classes, self.examples_per_client
        means = self.prototypes + rng.normal(0.0, SHIFT, size=self.prototypes.shape)
        y = np.concatenate([rng.permutation(k) for _ in range(-(-n // k))])[:n]  # balanced labels, shuffled
        x = means[y] + rng.normal(0.0, NOISE, size=(n, FEATURES))
        return ClientData(
            x={"features": torch.tensor(x, dtype=torch.float32)},
            y=torch.tensor(y, dtype=torch.long),
            present=torch.ones(n, 1, dtype=torch.bool),
            n_support=self.n_support,
        )


def make(cfg: DataConfig) -> PrototypePopulation:
    """The ``data.dataset = "my_data:make"`` factory: reads the standard ``[data]`` keys."""
    return PrototypePopulation(cfg.num_clients, cfg.examples_per_client, cfg.num_classes, cfg.support_fraction, cfg.heldout_fraction, cfg.seed)
