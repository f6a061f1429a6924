"""Datasets: every one implements :class:`fedmeta.data.base.FederatedDataset`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmeta.config import ConfigError
from fedmeta.data.base import Batch, ClientData, DataError, DatasetSpec, FederatedDataset, ModalitySpec, split_clients

if TYPE_CHECKING:
    from fedmeta.config import DataConfig

__all__ = [
    "Batch", "ClientData", "DataError", "DatasetSpec", "FederatedDataset", "ModalitySpec", "build_dataset",
    "resolve_dataset_factory", "split_clients",
]

BUILTIN = ("synthetic", "avdigits", "sine", "disk", "store")


def resolve_dataset_factory(name: str):
    """A built-in dataset name -> None; ``"package.module:callable"`` -> the callable (one-line error otherwise)."""
    if name in BUILTIN:
        return None
    from fedmeta.components import ComponentError, resolve

    factory = resolve(name, "data.dataset")
    if not callable(factory):
        raise ComponentError(f"config error: data.dataset: {name!r} is not callable")
    return factory


def _check_dataset(dataset, name: str) -> FederatedDataset:
    """The FederatedDataset protocol, checked up front so a user's dataset fails with one line, not mid-run."""
    from fedmeta.components import ComponentError

    missing = [a for a in ("spec", "num_clients", "train_clients", "heldout_clients", "client") if not hasattr(dataset, a)]
    if missing:
        raise ComponentError(f"config error: data.dataset: {name!r} returned {type(dataset).__name__} without {missing} (see fedmeta.data.FederatedDataset)")
    if not isinstance(dataset.spec, DatasetSpec):
        raise ComponentError(f"config error: data.dataset: {name!r}: .spec must be a fedmeta.data.DatasetSpec (got {type(dataset.spec).__name__})")
    from fedmeta.data.base import check_population

    check_population(dataset, f"config error: data.dataset: {name!r}", ComponentError)
    return dataset


class CheckedClients:
    """Every client a dataset returns, checked against its spec (:func:`fedmeta.data.base.check_client`)
    before any engine uses it: the same one-line ``DataError`` for the same bad client on every engine."""

    def __init__(self, dataset: FederatedDataset, where: str) -> None:
        self.base = dataset
        self.where = where
        self.spec = dataset.spec
        self.num_clients = dataset.num_clients
        self.train_clients = dataset.train_clients
        self.heldout_clients = dataset.heldout_clients
        if hasattr(dataset, "validation_clients"):
            self.validation_clients = dataset.validation_clients

    def client(self, cid: int) -> ClientData:
        from fedmeta.data.base import check_client

        return check_client(self.base.client(cid), self.spec, cid, self.where)

    def __getattr__(self, name: str):  # client_info(), examples_per_client ... of the wrapped dataset
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def build_dataset(cfg: "DataConfig", modalities: str = "") -> FederatedDataset:
    """The dataset a config names, restricted to ``modalities`` (comma-separated; "" = all).

    Pass ``cfg.model.modalities`` as ``modalities``. Construction is cheap: clients are built on demand.
    Then, for any dataset (built-in or a user's): ``data.missing_modality_mode = "sample"`` drops
    modalities per example (:class:`~fedmeta.data.subset.SampleDropout`), and
    ``data.validation_fraction`` carves validation clients out of the training clients of a dataset
    that has no validation group of its own.
    """
    from fedmeta.data.base import carve_validation, check_population, validation_clients, validation_count
    from fedmeta.data.subset import SampleDropout, WithValidation

    dataset = _build(cfg)
    local = ":LOCAL." in cfg.dataset  # an object passed to fedmeta.simulate(dataset=...): its generated name says nothing
    where = ("data.dataset" if local else f"data.dataset={cfg.dataset!r}") + (f" (data.path={cfg.path})" if cfg.path else "")
    check_population(dataset, where)  # every dataset: built-in, disk, store, a user's
    if not _validated_on_open(dataset):
        dataset = CheckedClients(dataset, where)
    if cfg.missing_modality_mode == "sample" and cfg.missing_modality_fraction > 0:
        dataset = SampleDropout(dataset, cfg.missing_modality_fraction, cfg.missing_modality, cfg.seed)
    if cfg.validation_fraction > 0 and not validation_clients(dataset):
        train, val = carve_validation(
            list(dataset.train_clients), validation_count(int(dataset.num_clients), cfg.validation_fraction), cfg.seed
        )
        dataset = WithValidation(dataset, train, val)
    if modalities:
        from fedmeta.data.subset import select_modalities

        return select_modalities(dataset, modalities)
    return dataset


def _validated_on_open(dataset) -> bool:
    """A store checks every array (dtypes, shapes, sizes, value ranges) when it is opened, and the
    vectorised engine reads its memory maps directly: it is not wrapped."""
    from fedmeta.data.store import StoreDataset

    return isinstance(dataset, StoreDataset)


def _per_client_missing(cfg: "DataConfig") -> float:
    """The built-in datasets' own (per-client) drop; off when examples drop modalities instead."""
    return cfg.missing_modality_fraction if cfg.missing_modality_mode == "client" else 0.0


def _build(cfg: "DataConfig") -> FederatedDataset:
    factory = resolve_dataset_factory(cfg.dataset)
    if factory is not None:
        try:
            dataset = factory(cfg)
        except (DataError, ConfigError):
            raise
        except Exception as err:  # noqa: BLE001 - a user's factory may raise anything
            from fedmeta.components import raised

            raise raised("data.dataset", cfg.dataset, err) from None
        return _check_dataset(dataset, cfg.dataset)
    if cfg.dataset == "synthetic":
        from fedmeta.data.synthetic import SyntheticMultimodal

        return SyntheticMultimodal(
            num_clients=cfg.num_clients,
            examples_per_client=cfg.examples_per_client,
            num_classes=cfg.num_classes,
            support_fraction=cfg.support_fraction,
            heldout_fraction=cfg.heldout_fraction,
            missing_modality_fraction=_per_client_missing(cfg),
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
            missing_modality_fraction=_per_client_missing(cfg),
            missing_modality=cfg.missing_modality or None,
            dirichlet_alpha=cfg.dirichlet_alpha,
            seed=cfg.seed,
            audio_domain=cfg.audio_domain,
            path=cfg.path or None,
            audio_dedup=cfg.audio_dedup,
            content_pool=cfg.content_pool,
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

        return DiskDataset(cfg.path, num_clients=cfg.num_clients)
    if cfg.dataset == "store":
        if not cfg.path:
            raise DataError("data.path: required when data.dataset = 'store' (a directory written by `fedmeta partition --format store`)")
        from fedmeta.data.store import StoreDataset

        return StoreDataset(cfg.path, num_clients=cfg.num_clients)
    raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}")
