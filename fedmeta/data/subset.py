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
