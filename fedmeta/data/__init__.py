"""Datasets: every one implements :class:`fedmeta.data.base.FederatedDataset`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmeta.config import ConfigError
from fedmeta.data.base import Batch, ClientData, DataError, DatasetSpec, FederatedDataset, ModalitySpec, split_clients

if TYPE_CHECKING:
    from fedmeta.config import DataConfig

__all__ = [
    "BUILTIN", "Batch", "ClientData", "DataError", "DatasetSpec", "FederatedDataset", "ModalitySpec", "build_dataset",
    "resolve_dataset_factory", "split_clients",
]

def resolve_dataset_factory(name: str):
    """``data.dataset`` -> the dataset factory: a registered name (:data:`fedmeta.registry.DATASETS`, the built-ins
    included) or ``"package.module:attr"``; one-line ``ComponentError`` otherwise."""
    from fedmeta.registry import DATASETS

    factory = DATASETS.resolve(name)
    if not callable(factory):
        from fedmeta.errors import ComponentError

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


def build_dataset(cfg: "DataConfig", modalities: str = "", factory=None) -> FederatedDataset:
    """The dataset a config names, restricted to ``modalities`` (comma-separated; "" = all).

    Pass ``cfg.model.modalities`` as ``modalities``. Construction is cheap: clients are built on demand.
    Then, for any dataset (built-in or a user's): ``data.missing_modality_mode = "sample"`` drops
    modalities per example (:class:`~fedmeta.data.subset.SampleDropout`), and
    ``data.validation_fraction`` carves validation clients out of the training clients of a dataset
    that has no validation group of its own. ``factory``: the resolved dataset factory
    (:class:`fedmeta.components.Components` passes it); None resolves ``cfg.dataset``.
    """
    from fedmeta.data.base import carve_validation, check_population, validation_clients, validation_count
    from fedmeta.data.subset import SampleDropout, WithValidation

    from fedmeta.registry import is_local

    dataset = _build(cfg, resolve_dataset_factory(cfg.dataset) if factory is None else factory)
    local = is_local(cfg.dataset)  # an object passed to fedmeta.simulate(dataset=...): its label names no file
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


def _build(cfg: "DataConfig", factory) -> FederatedDataset:
    """The factory's dataset; a user's factory is checked against the protocol and may fail with one line only."""
    from fedmeta.registry import DATASETS

    builtin = DATASETS.is_builtin(factory)
    try:
        dataset = factory(cfg)
    except (DataError, ConfigError):
        raise
    except Exception as err:  # noqa: BLE001 - a user's factory may raise anything
        if builtin:
            raise
        from fedmeta.registry import raised

        raise raised("data.dataset", cfg.dataset, err) from None
    return dataset if builtin else _check_dataset(dataset, cfg.dataset)


def __getattr__(name: str):
    if name == "BUILTIN":  # the built-in dataset names: the registry's contents (fedmeta.registry.DATASETS)
        from fedmeta.registry import DATASETS

        return DATASETS.builtin_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
