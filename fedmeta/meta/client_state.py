"""Client-state stores: where the simulation engines keep a stateful method's per-client state between rounds.

A stateful method (one that overrides :meth:`~fedmeta.meta.MetaAlgorithm.init_client_state`: SCAFFOLD's
``c_i``, Ditto's personal model, FedRep's head) gets its client's state as the last argument of
``client_update`` and returns the new one. In simulation the engine keeps it here, per client id; on a
deployed SuperNode the ClientApp keeps it in Flower's ``context.state`` instead (never sent to the server).

Two stores, with one interface (a cohort at a time, so the vectorised engine vmaps over the rows without
per-client Python): :meth:`gather` ``(cids, theta) -> {key: [C, *shape]}`` (a client never trained gets
``init_client_state(theta)``) and :meth:`scatter` ``(cids, {key: [C, *shape]})``.

* :class:`ClientStates` (``simulation.client_state = "memory"``): one dict of tensors per client that
  trained, in host memory, saved whole inside ``checkpoint.pt``.
* :class:`DiskClientStates` (``"disk"``): one stacked ``[P, *shape]`` array per state key, memory-mapped
  from ``<run dir>/client_state/<i>.bin`` (sparse files created on the first cohort: a row costs disk and
  memory only once its client trained), with a ``built.bin`` mask. ``checkpoint.pt`` holds only the
  layout and an epoch number; resume stays bit-identical through an undo journal
  (``journal-<epoch>.bin``): before a row is first overwritten after a checkpoint, its old bytes (and its
  built flag) are appended and fsync'd; a checkpoint fsyncs the arrays and starts a new epoch; a resume
  rolls the checkpoint epoch's journal back, so rows written after the checkpoint are undone.

``"auto"`` (the default, :func:`store_kind`) picks the disk store when the training population's client state
would be large: ``P >= 100,000`` clients or ``P x`` (bytes of one client's state) ``>= 1 GiB``.
Every file is created 0600, as ``checkpoint.pt`` is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmeta.errors import RunError

Params = dict[str, Tensor]

DIR = "client_state"  # under the run directory
AUTO_MIN_CLIENTS = 100_000
AUTO_MIN_BYTES = 1 << 30


def _model_part(theta: Params) -> Params:
    # fedmeta.meta.algorithm re-exports this module's ClientStates, so it is imported here, not at the top
    from fedmeta.meta.algorithm import model_params

    return model_params(theta)


def initial_state(algorithm: Any, theta: Params) -> Params:
    """A client's state before its first round: the method's ``init_client_state`` of the model's part of theta."""
    if not algorithm.stateful:
        return {}
    return {k: v.detach().cpu().clone() for k, v in algorithm.init_client_state(_model_part(theta)).items()}


def state_bytes(state: Params) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def store_kind(setting: str, algorithm: Any, population: int, theta: Params) -> str:
    """``"memory"`` or ``"disk"`` for ``simulation.client_state`` (``"auto"``: disk when the state would be large)."""
    if setting != "auto":
        return setting
    if not algorithm.stateful:
        return "memory"
    big = population >= AUTO_MIN_CLIENTS or population * state_bytes(initial_state(algorithm, theta)) >= AUTO_MIN_BYTES
    return "disk" if big else "memory"


def open_client_states(setting: str, algorithm: Any, run_dir: str | Path, population: int, theta: Params, resume: bool):
    """The store ``simulation.client_state`` names for a training population of ids ``< population``.

    A fresh run (``resume`` False) starts with no state: a disk store's old files in ``run_dir`` are removed.
    """
    directory = Path(run_dir) / DIR
    if store_kind(setting, algorithm, population, theta) == "memory":
        if not resume and directory.is_dir():  # an earlier run's disk store: stale for this one
            shutil.rmtree(directory)
        return ClientStates(algorithm)
    return DiskClientStates(algorithm, directory, population, fresh=not resume)


class ClientStates:
    """The in-memory store: one dict of tensors per client id that trained, checkpointed whole (:meth:`state_dict`)."""

    kind = "memory"

    def __init__(self, algorithm: Any) -> None:
        self.algorithm = algorithm
        self.states: dict[int, Params] = {}

    def get(self, cid: int, theta: Params) -> Params:
        state = self.states.get(int(cid))
        return initial_state(self.algorithm, theta) if state is None else state

    def put(self, cid: int, state: Params) -> None:
        if self.algorithm.stateful:
            self.states[int(cid)] = {k: v.detach().cpu().clone() for k, v in state.items()}

    def gather(self, cids: list[int], theta: Params) -> Params:
        """The cohort's states stacked per key (``[C, *shape]``, host memory)."""
        if not self.algorithm.stateful:
            return {}
        states = [self.get(cid, theta) for cid in cids]
        return {k: torch.stack([s[k] for s in states]) for k in states[0]}

    def scatter(self, cids: list[int], state: Params) -> None:
        """Keep row ``j`` of every key as client ``cids[j]``'s new state."""
        if self.algorithm.stateful:
            host = {k: v.detach().cpu() for k, v in state.items()}
            for j, cid in enumerate(cids):
                self.states[int(cid)] = {k: v[j].clone() for k, v in host.items()}

    def built_count(self) -> int:
        return len(self.states)

    def state_dict(self) -> dict[str, Any]:
        return {str(cid): s for cid, s in sorted(self.states.items())}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and state.get("store") == "disk":
            raise RunError("checkpoint.pt: its client state is in a disk store (client_state/), but this run keeps it in memory; "
                           "resume with simulation.client_state = 'disk'")
        self.states = {int(cid): dict(s) for cid, s in (state or {}).items()}


def _numpy_dtype(dtype: torch.dtype, key: str) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise RunError(f"simulation.client_state = 'disk': client state {key!r} has dtype {dtype}, which a memory-mapped file "
                       "cannot hold; use simulation.client_state = 'memory'") from None


def _create(path: Path, size: int) -> None:
    """A sparse file of ``size`` bytes, 0600 (its blocks are allocated only where rows are written)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskClientStates:
    """The memory-mapped store (see the module docstring): ``[P, *shape]`` per key under ``directory``, lazily created."""

    kind = "disk"

    def __init__(self, algorithm: Any, directory: Path, population: int, fresh: bool = True) -> None:
        self.algorithm = algorithm
        self.dir = Path(directory)
        self.population = int(population)
        self.epoch = 0
        self.layout: list[tuple[str, tuple[int, ...], str]] | None = None  # (key, shape, torch dtype name) per file
        self.arrays: list[np.memmap] = []
        self.built: np.memmap | None = None
        self.journaled: set[int] = set()  # clients whose pre-checkpoint row is in this epoch's journal
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)

    # -- files ---------------------------------------------------------------------
    def _journal(self, epoch: int | None = None) -> Path:
        return self.dir / f"journal-{self.epoch if epoch is None else epoch}.bin"

    def _create_files(self, sample: Params) -> None:
        """The layout from one client's state; sparse files for ``population`` rows of each key."""
        layout = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sorted(sample.items())]
        for key, _, dtype in layout:
            _numpy_dtype(getattr(torch, dtype), key)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for i, (_, shape, dtype) in enumerate(layout):
            _create(self.dir / f"{i}.bin", self.population * int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=getattr(torch, dtype)).element_size())
        _create(self.dir / "built.bin", self.population)
        text = json.dumps({"population": self.population, "layout": layout}).encode()
        fd = os.open(self.dir / "layout.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(text)
        self._map(layout)

    def _map(self, layout) -> None:
        self.layout = [(k, tuple(shape), dtype) for k, shape, dtype in layout]
        self.arrays = [np.memmap(self.dir / f"{i}.bin", dtype=_numpy_dtype(getattr(torch, dtype), key), mode="r+", shape=(self.population, *shape))
                       for i, (key, shape, dtype) in enumerate(self.layout)]
        self.built = np.memmap(self.dir / "built.bin", dtype=np.uint8, mode="r+", shape=(self.population,))

    def _row_bytes(self) -> list[int]:
        return [int(a.strides[0]) for a in self.arrays]

    # -- the cohort ------------------------------------------------------------------
    def gather(self, cids: list[int], theta: Params) -> Params:
        if not self.algorithm.stateful:
            return {}
        if self.layout is None:
            self._create_files(initial_state(self.algorithm, theta))
        idx = np.asarray(cids, dtype=np.int64)
        built = torch.from_numpy(np.asarray(self.built[idx]).astype(bool))
        out = {key: torch.from_numpy(np.array(a[idx])) for (key, _, _), a in zip(self.layout, self.arrays)}
        if not bool(built.all()):
            init = initial_state(self.algorithm, theta)
            for key, shape, _ in self.layout:
                mask = built.view(-1, *([1] * len(shape)))
                out[key] = torch.where(mask, out[key], init[key].to(out[key].dtype).unsqueeze(0))
        return out

    def scatter(self, cids: list[int], state: Params) -> None:
        if not self.algorithm.stateful:
            return
        if self.layout is None:
            raise RunError("client state: scatter before gather (internal error)")
        for key, shape, dtype in self.layout:
            v = state.get(key)
            if v is None or tuple(v.shape[1:]) != shape or str(v.dtype).removeprefix("torch.") != dtype:
                got = None if v is None else (tuple(v.shape[1:]), str(v.dtype))
                raise RunError(f"meta.algorithm: client_update returned client state {key!r} as {got}; "
                               f"init_client_state made it {(shape, dtype)} (a client's state keeps its keys, shapes and dtypes)")
        idx = np.asarray(cids, dtype=np.int64)
        self._journal_rows([int(c) for c in cids if int(c) not in self.journaled])
        for (key, _, _), a in zip(self.layout, self.arrays):
            a[idx] = state[key].detach().cpu().contiguous().numpy()
        self.built[idx] = 1

    def get(self, cid: int, theta: Params) -> Params:
        return {k: v[0] for k, v in self.gather([cid], theta).items()}

    def put(self, cid: int, state: Params) -> None:
        self.scatter([cid], {k: v.unsqueeze(0) for k, v in state.items()})

    def built_count(self) -> int:
        return 0 if self.built is None else int(np.count_nonzero(self.built))

    # -- the undo journal ---------------------------------------------------------------
    def _journal_rows(self, cids: list[int]) -> None:
        """Append (and fsync) the rows ``cids`` hold now, before they are overwritten: ``cid``, built flag, each key's bytes."""
        if not cids:
            return
        path = self._journal()
        if not path.exists():  # the first write since the checkpoint: the older epochs' journals are spent
            for old in self.dir.glob("journal-*.bin"):
                old.unlink()
        idx = np.asarray(cids, dtype=np.int64)
        parts = [idx.view(np.uint8).reshape(len(cids), 8), np.asarray(self.built[idx]).reshape(len(cids), 1)]
        parts += [np.ascontiguousarray(a[idx]).view(np.uint8).reshape(len(cids), -1) for a in self.arrays]
        records = np.concatenate(parts, axis=1)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, records.tobytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.journaled.update(cids)

    def _roll_back(self) -> None:
        """Undo every row written since the checkpoint of this epoch (a torn last record was never applied)."""
        path = self._journal()
        if not path.exists() or self.layout is None:
            return
        width = 9 + sum(self._row_bytes())
        raw = np.fromfile(path, dtype=np.uint8)
        records = raw[: (raw.size // width) * width].reshape(-1, width)
        if len(records):
            cids = records[:, :8].copy().view(np.int64).ravel()
            self.built[cids] = records[:, 8]
            at = 9
            for a, nbytes in zip(self.arrays, self._row_bytes()):
                a[cids] = records[:, at : at + nbytes].copy().view(a.dtype).reshape(len(cids), *a.shape[1:])
                at += nbytes
            self._flush()
        path.unlink()

    def _flush(self) -> None:
        for a in (*self.arrays, self.built):
            a.flush()
        for i in range(len(self.arrays)):
            _fsync(self.dir / f"{i}.bin")
        _fsync(self.dir / "built.bin")

    # -- the checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Make the arrays durable and start a new epoch; what ``checkpoint.pt`` keeps (the layout and the epoch)."""
        if self.layout is None:
            return {"store": "disk", "epoch": self.epoch, "population": self.population, "layout": None}
        self._flush()
        self.epoch += 1
        self.journaled = set()
        return {"store": "disk", "epoch": self.epoch, "population": self.population, "layout": [list(x) for x in self.layout]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Resume: the arrays as they were at the checkpoint (the checkpoint epoch's journal rolled back)."""
        if state and state.get("store") != "disk":
            raise RunError("checkpoint.pt: its client state is in memory (inside checkpoint.pt), but this run keeps it in a disk store; "
                           "resume with simulation.client_state = 'memory'")
        state = state or {"epoch": 0, "population": self.population, "layout": None}
        if int(state["population"]) != self.population:
            raise RunError(f"{self.dir}: holds client state for {state['population']} clients, this run has {self.population}")
        self.epoch, self.journaled = int(state["epoch"]), set()
        if state["layout"] is None:  # nothing was stored by the checkpoint
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.layout = None
            return
        if not (self.dir / "layout.json").is_file():
            raise RunError(f"{self.dir}: missing; checkpoint.pt's client state lives there (cannot resume bit-identically without it)")
        self._map(state["layout"])
        self._roll_back()
        for old in self.dir.glob("journal-*.bin"):  # other epochs' journals: spent
            old.unlink()


class CohortRows:
    """The client state of one cohort only: its rows, shipped with the cohort (what a Ray worker holds for one call).

    ``rows[key][j]`` is client ``cids[j]``'s state; :meth:`scatter` updates them in place, and the caller takes
    ``rows`` back to its own store.
    """

    kind = "rows"

    def __init__(self, cids: list[int], rows: Params) -> None:
        self.position = {int(c): j for j, c in enumerate(cids)}
        self.rows = {k: v.detach().cpu().clone() for k, v in rows.items()}

    def _index(self, cids: list[int]) -> Tensor:
        try:
            return torch.tensor([self.position[int(c)] for c in cids], dtype=torch.long)
        except KeyError as err:
            raise RunError(f"client state: client {err.args[0]} was not shipped with this cohort (internal error)") from None

    def gather(self, cids: list[int], theta: Params) -> Params:
        idx = self._index(cids)
        return {k: v[idx] for k, v in self.rows.items()}

    def scatter(self, cids: list[int], state: Params) -> None:
        idx = self._index(cids)
        for k in self.rows:
            self.rows[k][idx] = state[k].detach().cpu().to(self.rows[k].dtype)
