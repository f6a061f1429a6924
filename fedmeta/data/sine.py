"""Few-shot sinusoid regression (Finn et al., MAML, 2017, section 5.1).

Each client is one task ``y = A * sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase
``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``. A client holds ``examples_per_client`` points:
the first ``k_shot`` (default 5) are the support set (adaptation), the remaining
``examples_per_client - k_shot`` (default 10) the query set. ``noise_std`` adds Gaussian noise
to ``y`` (0 in the paper).

Modality ``x`` (kind ``vector``, shape ``(1,)``); task ``regression`` with ``output_dim`` 1, so
``y`` is ``[n, 1]`` float32. A client's task parameters and points are a deterministic function of
``(seed, cid)`` only (``task_params(cid)``), independent of ``num_clients``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmeta.data.base import ClientData, DataError, DatasetSpec, ModalitySpec, split_clients
from fedmeta.registry import DATASETS


class SineDataset:
    """A population of sinusoid regression tasks, one per client."""

    def __init__(
        self,
        num_clients: int = 100,
        heldout_fraction: float = 0.2,
        k_shot: int = 5,
        examples_per_client: int = 15,
        seed: int = 0,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
    ) -> None:
        if k_shot < 1:
            raise DataError(f"data.k_shot: need at least 1 support point, got {k_shot}")
        if examples_per_client <= k_shot:
            raise DataError(
                f"data.examples_per_client: must exceed data.k_shot ({k_shot}) to leave a query set, "
                f"got {examples_per_client}"
            )
        self.num_clients = int(num_clients)
        split = split_clients(self.num_clients, heldout_fraction, seed)
        self.train_clients, self.heldout_clients = split.train, split.heldout
        self.k_shot = int(k_shot)
        self.examples_per_client = int(examples_per_client)
        self.seed = int(seed)
        self.amplitude_range = tuple(map(float, amplitude_range))
        self.phase_range = tuple(map(float, phase_range))
        self.x_range = tuple(map(float, x_range))
        self.noise_std = float(noise_std)
        self.spec = DatasetSpec(
            modalities=(ModalitySpec("x", "vector", (1,)),), task="regression", num_classes=0, output_dim=1
        )

    def _rng(self, cid: int) -> np.random.Generator:
        if not 0 <= int(cid) < self.num_clients:
            raise DataError(f"sine: client id {cid} out of range [0, {self.num_clients})")
        return np.random.default_rng([self.seed, int(cid), 0x5111E])

    def task_params(self, cid: int) -> tuple[float, float]:
        """``(amplitude, phase)`` of client ``cid``'s sine."""
        rng = self._rng(cid)
        amp = rng.uniform(*self.amplitude_range)
        phase = rng.uniform(*self.phase_range)
        return float(amp), float(phase)

    def client(self, cid: int) -> ClientData:
        rng = self._rng(cid)
        amp = rng.uniform(*self.amplitude_range)  # same draws, in the same order, as task_params
        phase = rng.uniform(*self.phase_range)
        x = rng.uniform(*self.x_range, size=(self.examples_per_client, 1))
        y = amp * np.sin(x - phase)
        if self.noise_std > 0:
            y = y + rng.normal(0.0, self.noise_std, size=y.shape)
        n = self.examples_per_client
        return ClientData(
            x={"x": torch.from_numpy(x.astype(np.float32))},
            y=torch.from_numpy(y.astype(np.float32)),
            present=torch.ones(n, 1, dtype=torch.bool),
            n_support=self.k_shot,
        )


@DATASETS.register("sine")
def make_sine(cfg) -> SineDataset:
    """``data.dataset = "sine"``: the built-in dataset factory of a ``DataConfig``."""
    return SineDataset(
        num_clients=cfg.num_clients,
        heldout_fraction=cfg.heldout_fraction,
        k_shot=cfg.k_shot,
        examples_per_client=cfg.examples_per_client,
        seed=cfg.seed,
    )
