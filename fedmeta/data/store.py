"""A population as a few memory-mapped arrays: ``data.dataset = "store"`` (populations larger than RAM).

The ``fedmeta partition`` format (:mod:`fedmeta.data.disk`) is one directory per
client: right for deployments, wrong for a million simulated clients (a million
directories, a million ``open`` calls). A *store* is one ``.npy`` file per array,
the clients stacked on the first axis, opened with ``np.load(mmap_mode="r")``::

    store.json          {"format": "fedmeta-store", "version": 1, "num_clients": P, "rows": R, "spec": {...}}
    x.<modality>.npy    [P, R, *shape]  (float32, or int64 for tokens); rows past a client's n are zero
    y.npy               [P, R] int64 (classification) or [P, R, output_dim] float32
    present.npy         [P, R, M] bool
    n.npy, n_support.npy  [P] int64
    train.npy, heldout.npy  the split (client ids, int64); validation.npy too if the dataset has validation clients

Opening a store reads ``store.json`` and the small per-client arrays (``n``,
``n_support``, the split: 8 bytes x P each); the big arrays are mapped, and a
client's rows are read from disk when it is sampled. The vectorised engine's
:class:`~fedmeta.engines.vectorized.ClientStore` gathers a chunk's rows straight
from the maps (no per-client Python objects, nothing built at start-up).

``write_store`` fills the files chunk by chunk from any dataset's ``client(cid)``
(``np.lib.format.open_memmap``), so writing never holds the population in RAM:
``fedmeta partition --format store``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedmeta.data.base import ClientData, DataError, spec_to_dict
from fedmeta.registry import DATASETS

STORE_FILE = "store.json"
FORMAT, VERSION = "fedmeta-store", 1
CHECK_CHUNK = 4096  # clients per pass of the value checks on open


def _np_dtype(t: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=t).numpy().dtype


def write_store(dataset, out: str | Path, rows: int | None = None, flush_every: int = 4096, progress=None) -> Path:
    """Write ``dataset`` (every client, ids 0..num_clients-1) as a store in ``out``; returns ``out``.

    ``rows``: rows per client slot (default: the first client's ``n``, or ``dataset.examples_per_client``);
    a client with more rows is refused with one line. Memory stays bounded: written pages are flushed
    every ``flush_every`` clients.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    P = int(dataset.num_clients)
    first = dataset.client(0)
    R = int(rows or max(first.n, int(getattr(dataset, "examples_per_client", 0) or 0)))
    M = int(first.present.shape[1])

    def create(name: str, shape: tuple, dtype) -> np.memmap:
        return np.lib.format.open_memmap(out / name, mode="w+", dtype=dtype, shape=shape)

    xs = {k: create(f"x.{k}.npy", (P, R, *v.shape[1:]), _np_dtype(v.dtype)) for k, v in first.x.items()}
    y = create("y.npy", (P, R, *first.y.shape[1:]), _np_dtype(first.y.dtype))
    present = create("present.npy", (P, R, M), np.bool_)
    n = np.zeros(P, dtype=np.int64)
    n_support = np.zeros(P, dtype=np.int64)
    arrays = [*xs.values(), y, present]
    for cid in range(P):
        data = first if cid == 0 else dataset.client(cid)
        if data.n > R:
            raise DataError(f"write_store: client {cid} has {data.n} rows, more than the store's {R} (pass rows=)")
        for k, v in data.x.items():
            xs[k][cid, : data.n] = v.numpy()  # files start zero-filled: rows past n stay zero
        y[cid, : data.n] = data.y.numpy()
        present[cid, : data.n] = data.present.numpy()
        n[cid], n_support[cid] = data.n, data.n_support
        if (cid + 1) % flush_every == 0:
            for a in arrays:
                a.flush()
                _drop_pages(a)
            if progress is not None:
                progress(cid + 1, P)
    for a in arrays:
        a.flush()
    np.save(out / "n.npy", n)
    np.save(out / "n_support.npy", n_support)
    np.save(out / "train.npy", np.asarray(dataset.train_clients, dtype=np.int64))
    np.save(out / "heldout.npy", np.asarray(dataset.heldout_clients, dtype=np.int64))
    validation = list(getattr(dataset, "validation_clients", None) or [])  # optional third group
    if validation:
        np.save(out / "validation.npy", np.asarray(validation, dtype=np.int64))
    doc = {"format": FORMAT, "version": VERSION, "num_clients": P, "rows": R, "spec": spec_to_dict(dataset.spec),
           "modalities": list(xs)}
    (out / STORE_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    return out


def _advise_random(a: np.memmap) -> None:
    """Sampled clients are scattered: no read-ahead (which would read ~16x the rows a cohort needs)."""
    import mmap

    m = getattr(a, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            m.madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):
            pass


def _drop_pages(a: np.memmap) -> None:
    """Unmap the pages touched so far (``MADV_DONTNEED``; written pages were flushed first): RSS stays bounded."""
    import mmap

    m = getattr(a, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


class StoreDataset:
    """A ``FederatedDataset`` over a store directory; ``arrays()`` exposes the memory maps to the vectorised engine.

    Opening validates the store as :mod:`fedmeta.data.disk` validates a partition, each problem one
    ``DataError`` line naming the file: ``store.json`` (keys, types, the spec), every array's
    ``.npy`` header (dtype, shape, trailing shape from the spec) and its declared size against the
    file's size *before* anything is read or mapped, the split (ids in ``[0, num_clients)``, none
    twice, disjoint groups), ``n`` in ``[2, rows]`` and ``n_support`` in ``[1, n - 1]`` for every
    listed client, labels in ``[0, num_classes)`` (finite targets for regression) and token ids in
    ``[0, vocab_size)`` (one pass over ``y`` and the token arrays, ``CHECK_CHUNK`` clients at a time).
    """

    def __init__(self, path: str | Path, num_clients: int | None = None) -> None:
        from fedmeta.data.disk import _get, _int, _read_json, spec_from_json

        self.root = Path(path)
        index = self.root / STORE_FILE
        if not index.is_file():
            raise DataError(f"{self.root}: not a fedmeta store (no {STORE_FILE}; write one with `fedmeta partition --format store`)")
        doc = _read_json(index)  # one line for unreadable, invalid or too deeply nested JSON
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise DataError(f"{index}: not a {FORMAT} version {VERSION} index")
        self.spec = spec_from_json(_get(doc, "spec", index), index)
        self.num_clients = _int(_get(doc, "num_clients", index), "num_clients", index, lo=1)
        self.rows = _int(_get(doc, "rows", index), "rows", index, lo=1)
        mods = doc.get("modalities", list(self.spec.modality_names))
        if mods != list(self.spec.modality_names):
            raise DataError(f"{index}: 'modalities' {str(mods)[:80]} differ from the spec's {list(self.spec.modality_names)}")
        if num_clients is not None and num_clients != self.num_clients:
            raise DataError(f"data.num_clients: is {num_clients}, but {index} holds {self.num_clients} clients; set data.num_clients={self.num_clients}")
        P, R, spec = self.num_clients, self.rows, self.spec
        self._layout = {f"x.{m.name}.npy": (_np_dtype(m.dtype), (P, R, *m.shape)) for m in spec.modalities}
        self._layout["y.npy"] = (np.dtype(np.int64), (P, R)) if spec.task == "classification" else (np.dtype(np.float32), (P, R, spec.output_dim))
        self._layout["present.npy"] = (np.dtype(np.bool_), (P, R, len(spec.modalities)))
        for name in self._layout:  # headers and sizes of the big arrays now, before anything is mapped
            self._header(name)
        self._n = self._load("n.npy", (P,))
        self._n_support = self._load("n_support.npy", (P,))
        self.train_clients = self._load("train.npy").tolist()
        self.heldout_clients = self._load("heldout.npy").tolist()
        if (self.root / "validation.npy").exists():  # written only for datasets with validation clients
            self.validation_clients = self._load("validation.npy").tolist()
        self._maps: dict | None = None
        self._mapped: list[np.memmap] = []
        self._check_clients()
        self._check_values()

    def _header(self, name: str, shape: tuple | None = None) -> tuple[np.dtype, tuple]:
        """The ``.npy`` header of ``name``, checked against the layout (or a 1-D int64 of ``shape``)
        and its declared size against the file's size; reads only the header."""
        path = self.root / name
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape_, fortran, dtype = read(f, max_header_size=10_000)
                offset = f.tell()
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable .npy header ({' '.join(str(err).split())[:160]})") from None
        want_dtype, want_shape = self._layout.get(name, (np.dtype(np.int64), shape))
        if dtype != want_dtype or fortran:
            raise DataError(f"{path}: dtype {dtype}{' (Fortran order)' if fortran else ''}, the store needs {want_dtype}")
        if want_shape is None:
            if len(shape_) != 1:
                raise DataError(f"{path}: shape {list(shape_)}, the store needs a 1-D list of client ids")
        elif tuple(shape_) != tuple(want_shape):
            raise DataError(f"{path}: shape {list(shape_)}, the store needs {list(want_shape)} (num_clients, rows and the spec in {STORE_FILE})")
        declared = offset + int(np.prod(shape_, dtype=object)) * dtype.itemsize
        if declared != size:
            raise DataError(f"{path}: its header declares {declared} bytes, the file holds {size} (truncated or corrupt)")
        return dtype, tuple(shape_)

    def _load(self, name: str, shape: tuple | None = None, mmap: bool = False) -> np.ndarray:
        path = self.root / name
        self._header(name, shape)  # before np.load allocates or maps what the header declares
        try:
            a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable ({err})") from None
        if mmap:
            _advise_random(a)
            self._mapped.append(a)
        return a

    def _check_clients(self) -> None:
        """Sizes of every client against ``rows``; ``n_support`` in [1, n - 1] for the listed (used) clients."""
        n, k, R = self._n, self._n_support, self.rows
        bad = np.nonzero((n < 0) | (n > R) | (k < 0) | (k > n))[0]
        if bad.size:
            c = int(bad[0])
            raise DataError(f"{self.root / 'n.npy'}: client {c} has n={int(n[c])}, n_support={int(k[c])}; "
                            f"need 0 <= n_support <= n <= rows={R}")
        from fedmeta.data.base import check_population, validation_clients

        check_population(self, str(self.root))
        used = np.asarray(self.train_clients + self.heldout_clients + validation_clients(self), dtype=np.int64)
        short = used[(k[used] < 1) | (k[used] > n[used] - 1)]
        if short.size:
            c = int(short[0])
            raise DataError(f"{self.root / 'n_support.npy'}: client {c} has n_support={int(k[c])} of n={int(n[c])}; "
                            f"it must be in [1, n - 1] (a support set and a non-empty query set)")

    def _check_values(self) -> None:
        """Labels / targets and token ids of the whole store, ``CHECK_CHUNK`` clients at a time."""
        x, y, _, _, _ = self.arrays()
        y = y.numpy()  # numpy's reductions over the maps: ~50x torch's single-threaded min/max here
        spec = self.spec
        tokens = [(m, x[m.name].numpy()) for m in spec.modalities if m.kind == "tokens"]
        for lo in range(0, self.num_clients, CHECK_CHUNK):
            part = y[lo : lo + CHECK_CHUNK]
            if spec.task == "classification":
                if part.size and (int(part.min()) < 0 or int(part.max()) >= spec.num_classes):
                    raise DataError(f"{self.root / 'y.npy'}: labels outside [0, {spec.num_classes})")
            elif not bool(np.isfinite(part).all()):
                raise DataError(f"{self.root / 'y.npy'}: non-finite targets")
            for m, a in tokens:
                t = a[lo : lo + CHECK_CHUNK]
                if t.size and (int(t.min()) < 0 or int(t.max()) >= m.vocab_size):
                    raise DataError(f"{self.root / f'x.{m.name}.npy'}: token ids outside [0, {m.vocab_size})")
            self.release()

    def arrays(self) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor]:
        """(x, y, present, n, n_support) as tensors; the first three share memory with the read-only maps."""
        if self._maps is None:
            with warnings.catch_warnings():  # torch warns that the read-only maps are not writable: they are never written
                warnings.simplefilter("ignore", UserWarning)
                x = {m.name: torch.from_numpy(self._load(f"x.{m.name}.npy", mmap=True)) for m in self.spec.modalities}
                y = torch.from_numpy(self._load("y.npy", mmap=True))
                present = torch.from_numpy(self._load("present.npy", mmap=True))
            self._maps = {"x": x, "y": y, "present": present}
        m = self._maps
        return m["x"], m["y"], m["present"], torch.from_numpy(self._n.copy()), torch.from_numpy(self._n_support.copy())

    def release(self) -> None:
        """Unmap the pages read so far (``MADV_DONTNEED``): they stay in the page cache, but leave this process's RSS.

        The kernel maps pages *around* each one read (fault-around), so without this a process's RSS
        grows by ~25x the rows it gathered until it has mapped much of the file (measured: 1.9 GB for
        10,000 clients' audio rows). The engine calls this after each chunk's rows are copied out.
        """
        for a in self._mapped:
            _drop_pages(a)

    def client(self, cid: int) -> ClientData:
        if not 0 <= cid < self.num_clients:
            raise DataError(f"client id: must be in [0, {self.num_clients}) (got {cid})")
        x, y, present, _, _ = self.arrays()
        n = int(self._n[cid])
        return ClientData(
            x={k: v[cid, :n].clone() for k, v in x.items()}, y=y[cid, :n].clone(), present=present[cid, :n].clone(),
            n_support=int(self._n_support[cid]),
        )



def mapped_store(dataset) -> "StoreDataset | None":
    """The :class:`StoreDataset` whose memory maps hold exactly ``dataset``'s clients, or None.

    Seen through wrappers that only regroup or check clients (``data.validation_fraction``'s
    ``WithValidation``, ``CheckedClients``), never through ones that change them (``SampleDropout``,
    a modality subset), whose ``__getattr__`` would otherwise hand out the base's unchanged maps.
    """
    from fedmeta.data import CheckedClients
    from fedmeta.data.subset import WithValidation

    while isinstance(dataset, (WithValidation, CheckedClients)):
        dataset = dataset.base
    return dataset if isinstance(dataset, StoreDataset) else None


@DATASETS.register("store")
def make_store(cfg) -> StoreDataset:
    """``data.dataset = "store"``: a memory-mapped store written by ``fedmeta partition --format store`` under ``data.path``."""
    if not cfg.path:
        raise DataError("data.path: required when data.dataset = 'store' (a directory written by `fedmeta partition --format store`)")
    return StoreDataset(cfg.path, num_clients=cfg.num_clients)
