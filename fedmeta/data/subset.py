"""Modality subsets: ``model.modalities = "image"`` keeps only the named modalities of any dataset.

:func:`select_modalities` wraps a :class:`~fedmeta.data.base.FederatedDataset` and drops the other
modalities from its spec, from every client's ``x`` and from the ``present`` mask columns; clients,
labels and support/query splits are unchanged, so a fused run and a single-modality run see the same
examples. A client that lacked every kept modality keeps all-False ``present`` rows (the model then
uses only its learned "missing" embedding / zero fusion weights).
"""

from __future__ import annotations

from dataclasses import replace

from fedmeta.data.base import ClientData, DataError, FederatedDataset


def parse_modalities(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


class ModalitySubset:
    """``dataset`` restricted to ``names`` (kept in the dataset's spec order)."""

    def __init__(self, dataset: FederatedDataset, names: tuple[str, ...]) -> None:
        have = dataset.spec.modality_names
        unknown = [n for n in names if n not in have]
        if unknown or not names or len(set(names)) != len(names):
            raise DataError(f"model.modalities: must be distinct names from {have} (got {','.join(names)!r})")
        self.base = dataset
        self.columns = [i for i, n in enumerate(have) if n in names]
        self.names = tuple(have[i] for i in self.columns)
        self.spec = replace(dataset.spec, modalities=tuple(dataset.spec.modalities[i] for i in self.columns))
        self.num_clients = dataset.num_clients
        self.train_clients = dataset.train_clients
        self.heldout_clients = dataset.heldout_clients

    def client(self, cid: int) -> ClientData:
        d = self.base.client(cid)
        return ClientData(x={n: d.x[n] for n in self.names}, y=d.y, present=d.present[:, self.columns], n_support=d.n_support)

    def __getattr__(self, name: str):  # client_info() etc. of the wrapped dataset
        return getattr(self.base, name)


def select_modalities(dataset: FederatedDataset, modalities: str) -> FederatedDataset:
    """``dataset`` itself when ``modalities`` is "" or names all of them, else a :class:`ModalitySubset`."""
    names = parse_modalities(modalities)
    if not names or names == dataset.spec.modality_names:
        return dataset
    return ModalitySubset(dataset, names)


class WithValidation:
    """``dataset`` with ``validation`` clients taken out of its training clients (``data.validation_fraction``)."""

    def __init__(self, dataset: FederatedDataset, train: list[int], validation: list[int]) -> None:
        self.base = dataset
        self.spec = dataset.spec
        self.num_clients = dataset.num_clients
        self.train_clients = train
        self.validation_clients = validation
        self.heldout_clients = dataset.heldout_clients

    def client(self, cid: int) -> ClientData:
        return self.base.client(cid)

    def __getattr__(self, name: str):
        return getattr(self.base, name)


class SampleDropout:
    """FedMultimodal's missing-modality protocol: every example drops each modality independently.

    With probability ``p`` per example and modality (only ``modality``'s column when one is named),
    the modality is marked absent and its data zeroed. Deterministic in ``(seed, client id)``, so
    every engine and every process sees the same examples dropped.
    """

    def __init__(self, dataset: FederatedDataset, p: float, modality: str, seed: int) -> None:
        names = dataset.spec.modality_names
        if modality and modality not in names:
            raise DataError(f"data.missing_modality: {modality!r} is not one of {names}")
        if len(names) < 2:
            raise DataError("data.missing_modality_fraction: needs at least two modalities (or set it to 0)")
        self.base = dataset
        self.spec = dataset.spec
        self.num_clients = dataset.num_clients
        self.train_clients = dataset.train_clients
        self.heldout_clients = dataset.heldout_clients
        self.p, self.seed = p, seed
        self.columns = [names.index(modality)] if modality else list(range(len(names)))

    def client(self, cid: int) -> ClientData:
        import numpy as np
        import torch

        d = self.base.client(cid)
        rng = np.random.default_rng([self.seed, 0xD209, int(cid)])
        drop = np.zeros(tuple(d.present.shape), dtype=bool)
        drop[:, self.columns] = rng.random((d.n, len(self.columns))) < self.p
        present = d.present & ~torch.from_numpy(drop)
        x = {}
        for j, name in enumerate(self.spec.modality_names):
            v = d.x[name]
            gone = ~present[:, j]
            x[name] = v.masked_fill(gone.view(-1, *([1] * (v.dim() - 1))), 0) if bool(gone.any()) else v
        return ClientData(x=x, y=d.y, present=present, n_support=d.n_support)

    def __getattr__(self, name: str):
        return getattr(self.base, name)
