"""Datasets: every one implements :class:`fedmeta.data.base.FederatedDataset`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmeta.data.base import Batch, ClientData, DataError, DatasetSpec, FederatedDataset, ModalitySpec, split_clients

if TYPE_CHECKING:
    from fedmeta.config import DataConfig

__all__ = ["Batch", "ClientData", "DataError", "DatasetSpec", "FederatedDataset", "ModalitySpec", "build_dataset", "split_clients"]


def build_dataset(cfg: "DataConfig") -> FederatedDataset:
    """The dataset a config names. Construction is cheap: clients are built on demand."""
    if cfg.dataset == "synthetic":
        from fedmeta.data.synthetic import SyntheticMultimodal

        return SyntheticMultimodal(
            num_clients=cfg.num_clients,
            examples_per_client=cfg.examples_per_client,
            num_classes=cfg.num_classes,
            support_fraction=cfg.support_fraction,
            heldout_fraction=cfg.heldout_fraction,
            missing_modality_fraction=cfg.missing_modality_fraction,
            missing_modality=cfg.missing_modality,
            seed=cfg.seed,
        )
    raise DataError(f"data.dataset: {cfg.dataset!r} is not available in this build")
