"""Datasets: every one implements :class:`fedmeta.data.base.FederatedDataset`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmeta.data.base import Batch, ClientData, DataError, DatasetSpec, FederatedDataset, ModalitySpec, split_clients

if TYPE_CHECKING:
    from fedmeta.config import DataConfig

__all__ = ["Batch", "ClientData", "DataError", "DatasetSpec", "FederatedDataset", "ModalitySpec", "build_dataset", "split_clients"]


def build_dataset(cfg: "DataConfig", modalities: str = "") -> FederatedDataset:
    """The dataset a config names, restricted to ``modalities`` (comma-separated; "" = all).

    Pass ``cfg.model.modalities`` as ``modalities``. Construction is cheap: clients are built on demand.
    """
    dataset = _build(cfg)
    if modalities:
        from fedmeta.data.subset import select_modalities

        return select_modalities(dataset, modalities)
    return dataset


def _build(cfg: "DataConfig") -> FederatedDataset:
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
    if cfg.dataset == "avdigits":
        from fedmeta.data.avdigits import AVDigits

        return AVDigits(
            num_clients=cfg.num_clients,
            heldout_fraction=cfg.heldout_fraction,
            support_fraction=cfg.support_fraction,
            examples_per_client=cfg.examples_per_client,
            num_classes=cfg.num_classes,
            missing_modality_fraction=cfg.missing_modality_fraction,
            missing_modality=cfg.missing_modality or None,
            dirichlet_alpha=cfg.dirichlet_alpha,
            seed=cfg.seed,
            audio_domain=cfg.audio_domain,
            path=cfg.path or None,
        )
    if cfg.dataset == "sine":
        from fedmeta.data.sine import SineDataset

        return SineDataset(
            num_clients=cfg.num_clients,
            heldout_fraction=cfg.heldout_fraction,
            k_shot=cfg.k_shot,
            examples_per_client=cfg.examples_per_client,
            seed=cfg.seed,
        )
    if cfg.dataset == "disk":
        if not cfg.path:
            raise DataError("data.path: required when data.dataset = 'disk' (a directory written by `fedmeta partition`)")
        from fedmeta.data.disk import DiskDataset

        return DiskDataset(cfg.path)
    raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}")
