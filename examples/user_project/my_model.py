"""A user's own model: fixed random Fourier features (a buffer), a small learned MLP, label-smoothed loss.

fedmeta calls ``make(spec, cfg)`` with the dataset's
:class:`fedmeta.data.DatasetSpec` and the whole :class:`fedmeta.config.Config`
(here ``model.hidden_dim`` sizes the hidden layer). The module's
``forward(x, present)`` gets a dict of modality tensors and the ``[B, M]``
presence mask; its ``loss(outputs, y)`` replaces the default cross-entropy
everywhere fedmeta computes a loss (inner loop, evaluation, reported metrics).

Meta-learning acts on ``named_parameters()`` only. The random projection is a
*buffer*: it travels with the module, is never aggregated, and must come out
the same in every process; it does because fedmeta seeds ``torch`` with
``simulation.seed`` before calling the factory. Buffers must not be written
in ``forward`` (no running statistics, as ``BatchNorm`` keeps): the
vectorised engine shares the module across a cohort.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmeta.config import Config
from fedmeta.data import DatasetSpec

RANDOM_FEATURES = 64


class SmoothedMLP(nn.Module):
    def __init__(self, spec: DatasetSpec, hidden: int, smoothing: float = 0.1) -> None:
        super().__init__()
        if spec.task != "classification" or any(m.kind != "vector" for m in spec.modalities):
            raise ValueError("SmoothedMLP needs a classification dataset with 'vector' modalities only")
        self.names = spec.modality_names
        self.smoothing = smoothing
        d = sum(m.shape[0] for m in spec.modalities)
        self.register_buffer("projection", torch.randn(d, RANDOM_FEATURES) / d**0.5)
        self.register_buffer("phase", torch.rand(RANDOM_FEATURES) * 2 * torch.pi)
        self.body = nn.Sequential(nn.Linear(RANDOM_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, spec.num_classes))

    def forward(self, x: dict[str, Tensor], present: Tensor) -> Tensor:
        # a missing modality arrives as zeros; the mask makes that explicit
        h = torch.cat([x[name] * present[:, i : i + 1].to(x[name].dtype) for i, name in enumerate(self.names)], dim=-1)
        return self.body(torch.cos(h @ self.projection + self.phase))

    def loss(self, outputs: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(outputs, y, label_smoothing=self.smoothing)


def make(spec: DatasetSpec, cfg: Config) -> nn.Module:
    """The ``model.factory = "my_model:make"`` factory."""
    return SmoothedMLP(spec, cfg.model.hidden_dim)
