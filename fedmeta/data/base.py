"""The data interface every dataset implements.

A federated dataset is a population of clients. Each client holds named
modality arrays, labels and a per-example modality-presence mask; its first
``n_support`` examples are the support set (adaptation), the rest the query
set (evaluation). Some clients are *held out*: they never train and measure how
the meta-parameters serve new clients.

Datasets build clients lazily (``dataset.client(cid)``) so that a SuperNode
touches only its own partition and a large population never lives in memory as
Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

ModalityKind = Literal["image", "sequence", "tokens", "vector"]
TaskKind = Literal["classification", "regression"]


from fedmeta.errors import DataError  # noqa: E402,F401 - defined in fedmeta.errors


@dataclass(frozen=True)
class ModalitySpec:
    """One input modality.

    kind:
      * ``image``    float ``[H, W]`` (one channel) or ``[C, H, W]`` (channels first);
      * ``sequence`` float ``[T, F]`` (audio frames x features, 1-D signals with F=1);
      * ``tokens``   int64 ``[L]`` token ids, ``0`` is padding; needs ``vocab_size``;
      * ``vector``   float ``[D]``.
    """

    name: str
    kind: ModalityKind
    shape: tuple[int, ...]
    vocab_size: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.int64 if self.kind == "tokens" else torch.float32


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset."""

    modalities: tuple[ModalitySpec, ...]
    task: TaskKind = "classification"
    num_classes: int = 0  # 0 for regression; output dim is then ``output_dim``
    output_dim: int = 1

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)


@dataclass
class ClientData:
    """One client's private data.

    x:        modality name -> tensor ``[n, *shape]`` (zeros where absent)
    y:        ``[n]`` int64 labels (classification) or ``[n, output_dim]`` float (regression)
    present:  ``[n, M]`` bool, modality presence per example, columns in spec order
    n_support: the first ``n_support`` rows are the support set, the rest the query set
    """

    x: dict[str, Tensor]
    y: Tensor
    present: Tensor
    n_support: int

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_query(self) -> int:
        return self.n - self.n_support

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(
            x={k: v[start:stop] for k, v in self.x.items()},
            y=self.y[start:stop],
            present=self.present[start:stop],
        )

    def support(self) -> "Batch":
        return self.rows(0, self.n_support)

    def query(self) -> "Batch":
        return self.rows(self.n_support, self.n)

    def to(self, device: torch.device | str) -> "ClientData":
        return ClientData(
            x={k: v.to(device) for k, v in self.x.items()},
            y=self.y.to(device),
            present=self.present.to(device),
            n_support=self.n_support,
        )


@dataclass
class Batch:
    """A set of examples: the unit the model and the loss functions take."""

    x: dict[str, Tensor]
    y: Tensor
    present: Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            x={k: v.to(device) for k, v in self.x.items()},
            y=self.y.to(device),
            present=self.present.to(device),
        )


class FederatedDataset(Protocol):
    """A population of clients, built lazily.

    Three disjoint client groups: ``train_clients`` train; ``heldout_clients`` are the *test*
    clients, which neither train nor choose anything; an optional ``validation_clients`` list
    (a dataset without the attribute has none) is what hyper-parameters are chosen on. A dataset
    without its own validation group gets one carved from its training clients by
    ``data.validation_fraction`` (:func:`carve_validation`).
    """

    spec: DatasetSpec
    num_clients: int
    train_clients: list[int]
    heldout_clients: list[int]
    # optional: validation_clients: list[int]

    def client(self, cid: int) -> ClientData: ...


#: The client groups: ``train`` (trains), ``validation`` (chooses hyper-parameters), ``test`` (reports).
GROUPS = ("train", "validation", "test")


def validation_clients(dataset) -> list[int]:
    """A dataset's validation clients; ``[]`` for a dataset without the optional attribute."""
    return list(getattr(dataset, "validation_clients", None) or [])


def client_group(dataset, cid: int) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` (held out) for client ``cid`` of ``dataset``."""
    if cid in set(dataset.heldout_clients):
        return "test"
    return "validation" if cid in set(validation_clients(dataset)) else "train"


from fedmeta.population import heldout_count, validation_count  # noqa: E402,F401 - torch-free, shared with fedmeta.config


def carve_validation(train: list[int], count: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``count`` validation clients off ``train`` (deterministic in ``seed``); ``(train, validation)``.

    The test (held-out) group is untouched, so a run with validation clients is scored on exactly
    the test clients of the same run without them.
    """
    if count <= 0:
        return sorted(train), []
    if count >= len(train):
        raise DataError(
            f"data.validation_fraction: leaves no training clients ({count} validation of {len(train)} non-test clients)"
        )
    perm = np.random.default_rng([seed, 0x7A11D]).permutation(sorted(train))
    return sorted(perm[count:].tolist()), sorted(perm[:count].tolist())


@dataclass
class ClientSplit:
    """Which clients train and which are held out."""

    train: list[int] = field(default_factory=list)
    heldout: list[int] = field(default_factory=list)


def split_clients(num_clients: int, heldout_fraction: float, seed: int) -> ClientSplit:
    """Deterministically split client ids into train and held-out groups.

    At least one client lands on each side.
    """
    if num_clients < 2:
        raise DataError(f"data.num_clients: need at least 2 clients, got {num_clients}")
    rng = np.random.default_rng([seed, 0xC11E])
    perm = rng.permutation(num_clients)
    n_held = heldout_count(num_clients, heldout_fraction)
    return ClientSplit(train=sorted(perm[n_held:].tolist()), heldout=sorted(perm[:n_held].tolist()))


def spec_to_dict(spec: DatasetSpec) -> dict:
    """The JSON form of a spec (``SPEC`` in :mod:`fedmeta.data.disk`; also what a ClientApp reports)."""
    return {
        "modalities": [
            {"name": m.name, "kind": m.kind, "shape": [int(s) for s in m.shape], "vocab_size": int(m.vocab_size)}
            for m in spec.modalities
        ],
        "task": spec.task,
        "num_classes": int(spec.num_classes),
        "output_dim": int(spec.output_dim),
    }


def spec_from_dict(d: dict) -> DatasetSpec:
    try:
        mods = tuple(ModalitySpec(m["name"], m["kind"], tuple(m["shape"]), int(m.get("vocab_size", 0))) for m in d["modalities"])
        return DatasetSpec(mods, d.get("task", "classification"), int(d.get("num_classes", 0)), int(d.get("output_dim", 1)))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"dataset spec: malformed ({err})") from None


# --------------------------------------------------------------------------- the checks every dataset goes through
def _is_id(c: object) -> bool:
    return isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_))


def check_population(dataset, where: str, error: type[Exception] = DataError) -> None:
    """The client groups of any dataset (built-in, disk, store, a user's): ids are ints in
    ``[0, num_clients)``, none listed twice, the train / validation / test groups disjoint, at least
    one training client. Raises ``error`` with one line starting with ``where``."""
    num = dataset.num_clients
    if not _is_id(num) or int(num) < 1:
        raise error(f"{where}: num_clients must be an integer >= 1 (got {num!r})")
    groups = {"train_clients": list(dataset.train_clients), "validation_clients": validation_clients(dataset),
              "heldout_clients": list(dataset.heldout_clients)}
    if not groups["train_clients"]:
        raise error(f"{where}: has no training clients")
    seen: dict[int, str] = {}
    for name, ids in groups.items():
        for c in ids:
            if not _is_id(c) or not 0 <= int(c) < int(num):
                raise error(
                    f"{where}: {name}: client ids must be distinct ints in [0, num_clients={num}) "
                    f"split between train_clients, validation_clients and heldout_clients (bad: {c!r})"
                )
            if int(c) in seen:
                both = name if seen[int(c)] == name else f"{seen[int(c)]} and {name}"
                raise error(
                    f"{where}: client {int(c)} is listed twice ({both}); client ids must be distinct "
                    "and split between train_clients, validation_clients and heldout_clients"
                )
            seen[int(c)] = name


def check_client(data: object, spec: DatasetSpec, cid: int, where: str = "") -> ClientData:
    """One client against its dataset's spec (every engine calls this on what ``dataset.client(cid)`` returns):
    exactly the spec's modalities, their dtypes and trailing shapes, ``y`` and ``present`` for ``n``
    rows, labels in ``[0, num_classes)``, token ids in ``[0, vocab_size)``, finite floats, and
    ``n_support`` in ``[1, n - 1]`` (a support set to adapt on and a query set to score). ``DataError``
    (one line naming the client) otherwise; returns ``data``."""
    at = f"{where}: client {cid}" if where else f"client {cid}"
    if not isinstance(data, ClientData):
        raise DataError(f"{at}: client() must return a fedmeta.data.ClientData (got {type(data).__name__})")
    if not isinstance(data.y, Tensor) or data.y.dim() < 1:
        raise DataError(f"{at}: y must be a tensor [n, ...] (got {type(data.y).__name__})")
    n = data.n
    names = spec.modality_names
    x = data.x if isinstance(data.x, dict) else {}
    missing = [m for m in names if m not in x]
    extra = [k for k in x if k not in names]
    if missing or extra or not isinstance(data.x, dict):
        what = f"no data for modality {missing[0]!r}" if missing else f"modality {str(extra[0])[:40]!r} is not in the spec"
        raise DataError(f"{at}: {what} (x must hold exactly the spec's modalities {list(names)})")

    def need(t: object, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        if not isinstance(t, Tensor):
            raise DataError(f"{at}: {name} must be a tensor (got {type(t).__name__})")
        if t.dtype != dtype:
            raise DataError(f"{at}: {name} has dtype {str(t.dtype).removeprefix('torch.')}, the spec needs {str(dtype).removeprefix('torch.')}")
        if tuple(t.shape) != shape:
            raise DataError(f"{at}: {name} has shape {list(t.shape)}, the spec and n={n} need {list(shape)}")
        return t

    for m in spec.modalities:
        v = need(x[m.name], f"x[{m.name!r}]", m.dtype, (n, *m.shape))
        if m.kind == "tokens":
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= m.vocab_size):
                raise DataError(f"{at}: x[{m.name!r}] holds token ids outside [0, {m.vocab_size})")
        elif not bool(torch.isfinite(v).all()):
            raise DataError(f"{at}: x[{m.name!r}] holds non-finite values")
    if spec.task == "classification":
        y = need(data.y, "y", torch.int64, (n,))
        if n and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            raise DataError(f"{at}: labels outside [0, {spec.num_classes})")
    else:
        y = need(data.y, "y", torch.float32, (n, spec.output_dim))
        if not bool(torch.isfinite(y).all()):
            raise DataError(f"{at}: non-finite targets")
    need(data.present, "present", torch.bool, (n, len(names)))
    k = data.n_support
    if not _is_id(k) or not 1 <= int(k) <= n - 1:
        raise DataError(f"{at}: n_support must be an integer in [1, n - 1] = [1, {n - 1}] (a support and a query set), got {k!r}")
    return data


def per_client_missing(cfg) -> float:
    """The built-in datasets' own (per-client) modality drop of a ``DataConfig``; off when examples drop modalities instead."""
    return cfg.missing_modality_fraction if cfg.missing_modality_mode == "client" else 0.0
