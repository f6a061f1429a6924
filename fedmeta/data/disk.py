"""The on-disk per-client format: user data and deployments.

Layout (``write_partitions`` writes it, ``DiskDataset`` / ``load_client_with_id`` read it)::

    ROOT/
      dataset.json
      client_00000/
        meta.json
        x_<modality>.npy      one per modality in spec order (e.g. x_image.npy, x_audio.npy)
        y.npy
        present.npy
      client_00001/
      ...

``dataset.json``::

    {
      "format": "fedmeta-dataset", "version": 1,
      "spec": SPEC,
      "num_clients": 100,               # size of the population the ids come from
      "clients": [{"id": 0, "dir": "client_00000", "heldout": false}, ...]
    }

A validation client (``data.validation_fraction``) is written ``"heldout": true, "group": "validation"``
in both files: held out from training for any reader, chosen on, never reported as a test client.

Only the listed clients exist (a deployment may ship a subset); iterate ``train_clients`` and
``heldout_clients``, not ``range(num_clients)``. A run on a disk dataset (``data.dataset = "disk"``)
needs ``data.num_clients`` equal to the number of clients listed (what every config-level check,
cohort size and privacy sample rate included, is computed from); anything else is a ``DataError``
naming both numbers, never a silently smaller or larger population.

``meta.json`` (one per client directory; enough on its own for a SuperNode that has only its
directory)::

    {
      "format": "fedmeta-client", "version": 1,
      "client_id": 7, "heldout": false,
      "n": 20, "n_support": 10,           # the first n_support rows are the support set
      "spec": SPEC,
      "files": {
        "image":   {"file": "x_image.npy", "dtype": "float32", "shape": [20, 8, 8], "sha256": "..."},
        "y":       {"file": "y.npy",       "dtype": "int64",   "shape": [20],       "sha256": "..."},
        "present": {"file": "present.npy", "dtype": "bool",    "shape": [20, 2],    "sha256": "..."}
      }
    }

``SPEC``::

    {"modalities": [{"name": "image", "kind": "image", "shape": [8, 8], "vocab_size": 0}, ...],
     "task": "classification", "num_classes": 10, "output_dim": 1}

Arrays are plain ``.npy`` files (``numpy.save``, no pickles):

* ``x_<name>.npy``: ``[n, *shape]``, ``float32`` (kinds image/sequence/vector) or ``int64``
  (kind tokens, ids in ``[0, vocab_size)``, 0 is padding). Rows where the modality is absent
  hold zeros (enforced on load).
* ``y.npy``: ``int64 [n]`` labels in ``[0, num_classes)`` (classification) or
  ``float32 [n, output_dim]`` (regression).
* ``present.npy``: ``bool [n, M]``, column j tells whether modality j (spec order) is present.

Modality names must match ``[A-Za-z0-9_.-]+``. The ``sha256`` of each file is checked on load
(``verify=False`` skips it); with verification on, an entry without ``sha256`` is an error, not a
silent skip. Every problem with a file (missing, truncated, unreadable, bad JSON,
missing key, dtype/shape that differ from ``meta.json``, checksum mismatch, labels or token ids out
of range, non-finite values) raises ``DataError`` with a one-line message that names the file.
Loading a client reads that client's directory only.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from fedmeta.data.base import ClientData, DataError, DatasetSpec, FederatedDataset, ModalitySpec, spec_to_dict
from fedmeta.registry import DATASETS

FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
META_FILE = "meta.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_KINDS = ("image", "sequence", "tokens", "vector")
_TASKS = ("classification", "regression")


# --------------------------------------------------------------------------- spec <-> JSON (writing: base.spec_to_dict)
def _get(obj: Any, key: str, where: Path, prefix: str = "") -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: '{prefix.rstrip('.') or '<root>'}' must be a JSON object")
    if key not in obj:
        raise DataError(f"{where}: missing key '{prefix}{key}'")
    return obj[key]


def _int(v: Any, what: str, where: Path, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise DataError(f"{where}: '{what}' must be an integer >= {lo}, got {v!r}")
    return v


def spec_from_json(d: Any, where: Path) -> DatasetSpec:
    """Parse a SPEC object; errors name ``where``."""
    mods_raw = _get(d, "modalities", where, "spec.")
    if not isinstance(mods_raw, list) or not mods_raw:
        raise DataError(f"{where}: 'spec.modalities' must be a non-empty list")
    mods = []
    for i, m in enumerate(mods_raw):
        p = f"spec.modalities[{i}]."
        name = _get(m, "name", where, p)
        kind = _get(m, "kind", where, p)
        shape = _get(m, "shape", where, p)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise DataError(f"{where}: '{p}name' must match [A-Za-z0-9_.-]+, got {name!r}")
        if kind not in _KINDS:
            raise DataError(f"{where}: '{p}kind' must be one of {_KINDS}, got {kind!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise DataError(f"{where}: '{p}shape' must be a list of positive integers, got {shape!r}")
        vocab = _int(m.get("vocab_size", 0), p + "vocab_size", where)
        if kind == "tokens" and vocab < 1:
            raise DataError(f"{where}: '{p}vocab_size' must be >= 1 for kind 'tokens'")
        mods.append(ModalitySpec(name=name, kind=kind, shape=tuple(shape), vocab_size=vocab))
    if len({m.name for m in mods}) != len(mods):
        raise DataError(f"{where}: duplicate modality names in 'spec.modalities'")
    task = _get(d, "task", where, "spec.")
    if task not in _TASKS:
        raise DataError(f"{where}: 'spec.task' must be one of {_TASKS}, got {task!r}")
    num_classes = _int(_get(d, "num_classes", where, "spec."), "spec.num_classes", where)
    output_dim = _int(d.get("output_dim", 1), "spec.output_dim", where, lo=1)
    if task == "classification" and num_classes < 2:
        raise DataError(f"{where}: 'spec.num_classes' must be >= 2 for classification, got {num_classes}")
    return DatasetSpec(modalities=tuple(mods), task=task, num_classes=num_classes, output_dim=output_dim)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:  # e.g. [[[[...]]]] a hundred thousand deep: the parser's recursion, not a traceback
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None


# --------------------------------------------------------------------------- expected arrays
def _expected(spec: DatasetSpec, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype name, shape) for one client of ``n`` rows."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for m in spec.modalities:
        out[m.name] = ("int64" if m.kind == "tokens" else "float32", (n, *m.shape))
    if spec.task == "classification":
        out["y"] = ("int64", (n,))
    else:
        out["y"] = ("float32", (n, spec.output_dim))
    out["present"] = ("bool", (n, len(spec.modalities)))
    return out


def _file_name(key: str, spec: DatasetSpec) -> str:
    return f"x_{key}.npy" if key in spec.modality_names else f"{key}.npy"


# --------------------------------------------------------------------------- writing
def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def write_client_dir(
    data: ClientData, spec: DatasetSpec, path: str | Path, client_id: int, heldout: bool = False, group: str = ""
) -> Path:
    """Write one client to directory ``path`` (created); returns it. ``meta.json`` is written last."""
    path = Path(path)
    for m in spec.modalities:
        if not _NAME_RE.match(m.name):
            raise DataError(f"modality name {m.name!r} cannot be a file name (use [A-Za-z0-9_.-]+)")
    n = data.n
    if not 0 <= data.n_support <= n:
        raise DataError(f"client {client_id}: n_support {data.n_support} outside [0, {n}]")
    arrays: dict[str, np.ndarray] = {}
    for key, (dtype, shape) in _expected(spec, n).items():
        t = data.present if key == "present" else data.y if key == "y" else data.x.get(key)
        if t is None:
            raise DataError(f"client {client_id}: no data for modality {key!r}")
        a = t.detach().cpu().numpy().astype(dtype, copy=False)
        if a.shape != shape:
            raise DataError(f"client {client_id}: {key} has shape {list(a.shape)}, spec wants {list(shape)}")
        arrays[key] = a
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).unlink(missing_ok=True)  # a half-rewritten client must not look complete
    files = {}
    for key, a in arrays.items():
        raw = _npy_bytes(a)
        fname = _file_name(key, spec)
        (path / fname).write_bytes(raw)
        files[key] = {"file": fname, "dtype": str(a.dtype), "shape": list(a.shape),
                      "sha256": hashlib.sha256(raw).hexdigest()}
    meta = {
        "format": "fedmeta-client",
        "version": FORMAT_VERSION,
        "client_id": int(client_id),
        "heldout": bool(heldout) or group == "validation",
        **({"group": "validation"} if group == "validation" else {}),
        "n": n,
        "n_support": int(data.n_support),
        "spec": spec_to_dict(spec),
        "files": files,
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def client_dir_name(cid: int) -> str:
    return f"client_{int(cid):05d}"


def write_partitions(
    dataset: FederatedDataset, out_dir: str | Path, clients: Iterable[int] | None = None
) -> Path:
    """Write clients of ``dataset`` (all train and held-out clients by default) under ``out_dir``.

    Returns ``out_dir``. ``dataset.json`` is written last, listing exactly the clients written.
    """
    out = Path(out_dir)
    from fedmeta.data.base import client_group, validation_clients

    heldout = set(int(c) for c in dataset.heldout_clients)
    every = set(int(c) for c in dataset.train_clients) | heldout | set(validation_clients(dataset))
    ids = sorted(every) if clients is None else [int(c) for c in clients]
    if len(set(ids)) != len(ids):
        raise DataError("write_partitions: duplicate client ids")
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_FILE).unlink(missing_ok=True)
    entries = []
    for cid in ids:
        if not 0 <= cid < dataset.num_clients:
            raise DataError(f"write_partitions: client id {cid} out of range [0, {dataset.num_clients})")
        d = client_dir_name(cid)
        group = client_group(dataset, cid)
        write_client_dir(dataset.client(cid), dataset.spec, out / d, cid, cid in heldout, group)
        entries.append({"id": cid, "dir": d, "heldout": group != "train"} | ({"group": group} if group == "validation" else {}))
    index = {
        "format": "fedmeta-dataset",
        "version": FORMAT_VERSION,
        "spec": spec_to_dict(dataset.spec),
        "num_clients": int(dataset.num_clients),
        "clients": entries,
    }
    (out / DATASET_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out


# --------------------------------------------------------------------------- reading
def _check_version(doc: Any, fmt: str, where: Path) -> None:
    f = _get(doc, "format", where)
    v = _get(doc, "version", where)
    if f != fmt:
        raise DataError(f"{where}: 'format' is {f!r}, expected {fmt!r}")
    if v != FORMAT_VERSION:
        raise DataError(f"{where}: unsupported format version {v!r} (this fedmeta reads {FORMAT_VERSION})")


def _load_npy(path: Path, dtype: str, shape: tuple[int, ...], sha256: str | None) -> np.ndarray:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"{path}: sha256 does not match meta.json (file changed, truncated or corrupted)")
    try:
        a = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # truncated data, bad header, pickled object arrays ...
        msg = " ".join(str(e).split())[:200]
        raise DataError(f"{path}: unreadable .npy (truncated or corrupt: {msg})") from None
    if not isinstance(a, np.ndarray):
        raise DataError(f"{path}: not a single .npy array")
    if str(a.dtype) != dtype:
        raise DataError(f"{path}: dtype {a.dtype} does not match meta.json ({dtype})")
    if a.shape != shape:
        raise DataError(f"{path}: shape {list(a.shape)} does not match meta.json ({list(shape)})")
    return a


def _load_client(path: Path, verify: bool) -> tuple[ClientData, DatasetSpec, str, int]:
    meta_path = path / META_FILE
    if not path.is_dir():
        raise DataError(f"{path}: client directory not found")
    meta = _read_json(meta_path)
    _check_version(meta, "fedmeta-client", meta_path)
    spec = spec_from_json(_get(meta, "spec", meta_path), meta_path)
    cid = _int(_get(meta, "client_id", meta_path), "client_id", meta_path)
    heldout = _group(meta, meta_path, "")
    n = _int(_get(meta, "n", meta_path), "n", meta_path)
    n_support = _int(_get(meta, "n_support", meta_path), "n_support", meta_path)
    if n_support > n:
        raise DataError(f"{meta_path}: 'n_support' {n_support} exceeds 'n' {n}")
    files = _get(meta, "files", meta_path)
    arrays: dict[str, np.ndarray] = {}
    for key, (dtype, shape) in _expected(spec, n).items():
        entry = _get(files, key, meta_path, "files.")
        fname = _get(entry, "file", meta_path, f"files.{key}.")
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname in ("", ".", ".."):
            raise DataError(f"{meta_path}: 'files.{key}.file' must be a plain file name, got {fname!r}")
        if entry.get("dtype", dtype) != dtype or list(entry.get("shape", shape)) != list(shape):
            raise DataError(
                f"{meta_path}: 'files.{key}' declares {entry.get('dtype')} {entry.get('shape')}, "
                f"the spec and n={n} need {dtype} {list(shape)}"
            )
        digest = None
        if verify:
            digest = entry.get("sha256")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise DataError(
                    f"{path / fname}: no valid sha256 in {meta_path.name} 'files.{key}.sha256' "
                    f"(got {digest!r}); checksums are required (verify=False skips them)"
                )
        arrays[key] = _load_npy(path / fname, dtype, shape, digest)

    fpath = lambda key: path / files[key]["file"]  # noqa: E731
    present = arrays["present"]
    y = arrays["y"]
    if spec.task == "classification":
        if n and (y.min() < 0 or y.max() >= spec.num_classes):
            raise DataError(f"{fpath('y')}: labels outside [0, {spec.num_classes})")
    elif not np.isfinite(y).all():
        raise DataError(f"{fpath('y')}: non-finite targets")
    x: dict[str, torch.Tensor] = {}
    for j, m in enumerate(spec.modalities):
        a = arrays[m.name]
        if m.kind == "tokens":
            if a.size and (a.min() < 0 or a.max() >= m.vocab_size):
                raise DataError(f"{fpath(m.name)}: token ids outside [0, {m.vocab_size})")
        elif not np.isfinite(a).all():
            raise DataError(f"{fpath(m.name)}: non-finite values")
        if not present[:, j].all():
            a = a.copy()
            a[~present[:, j]] = 0  # absent modality data is zeros
        x[m.name] = torch.from_numpy(a)
    data = ClientData(x=x, y=torch.from_numpy(y), present=torch.from_numpy(present), n_support=n_support)
    return data, spec, heldout, cid


def _group(doc: Any, where: Path, prefix: str) -> str:
    """``"train"``, ``"test"`` or ``"validation"`` from an entry's ``heldout`` and optional ``group``."""
    heldout = _get(doc, "heldout", where, prefix)
    if not isinstance(heldout, bool):
        raise DataError(f"{where}: '{prefix}heldout' must be true or false")
    group = doc.get("group", "") if isinstance(doc, dict) else ""
    if group not in ("", "validation") or (group == "validation" and not heldout):
        raise DataError(f"{where}: '{prefix}group' may only be \"validation\", with heldout true (got {str(group)[:40]!r})")
    return "validation" if group else "test" if heldout else "train"


def load_client_with_id(path: str | Path, verify: bool = True) -> tuple[ClientData, DatasetSpec, str, int]:
    """Load one client directory (all a SuperNode needs): ``(data, spec, group, client id)``;
    group is ``"train"``, ``"validation"`` or ``"test"`` (held out)."""
    return _load_client(Path(path), verify)


class DiskDataset:
    """A ``FederatedDataset`` over a directory written by ``write_partitions``; clients load lazily."""

    def __init__(self, path: str | Path, verify: bool = True, num_clients: int | None = None) -> None:
        """``num_clients``: the config's ``data.num_clients``; if given it must equal the number of
        clients listed in ``dataset.json``."""
        self.root = Path(path)
        self.verify = verify
        index_path = self.root / DATASET_FILE
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset directory not found")
        doc = _read_json(index_path)
        _check_version(doc, "fedmeta-dataset", index_path)
        self.spec = spec_from_json(_get(doc, "spec", index_path), index_path)
        self.num_clients = _int(_get(doc, "num_clients", index_path), "num_clients", index_path, lo=1)
        clients = _get(doc, "clients", index_path)
        if not isinstance(clients, list) or not clients:
            raise DataError(f"{index_path}: 'clients' must be a non-empty list")
        self._dirs: dict[int, str] = {}
        self._heldout: dict[int, str] = {}  # client id -> group
        for i, c in enumerate(clients):
            p = f"clients[{i}]."
            cid = _int(_get(c, "id", index_path, p), p + "id", index_path)
            d = _get(c, "dir", index_path, p)
            h = _group(c, index_path, p)
            if cid >= self.num_clients:
                raise DataError(f"{index_path}: '{p}id' {cid} is not below num_clients {self.num_clients}")
            if cid in self._dirs:
                raise DataError(f"{index_path}: client id {cid} listed twice")
            if not isinstance(d, str) or not d or "/" in d or "\\" in d or d in (".", ".."):
                raise DataError(f"{index_path}: '{p}dir' must be a plain directory name, got {d!r}")
            self._dirs[cid], self._heldout[cid] = d, h
        self.train_clients = sorted(c for c, g in self._heldout.items() if g == "train")
        self.validation_clients = sorted(c for c, g in self._heldout.items() if g == "validation")
        self.heldout_clients = sorted(c for c, g in self._heldout.items() if g == "test")
        if num_clients is not None and num_clients != len(self._dirs):
            raise DataError(
                f"data.num_clients: is {num_clients}, but {index_path} lists {len(self._dirs)} clients "
                f"({len(self.train_clients)} training, {len(self.heldout_clients)} held out); "
                f"set data.num_clients={len(self._dirs)}"
            )

    def client_dir(self, cid: int) -> Path:
        if int(cid) not in self._dirs:
            raise DataError(f"{self.root / DATASET_FILE}: no client with id {cid}")
        return self.root / self._dirs[int(cid)]

    def client(self, cid: int) -> ClientData:
        path = self.client_dir(cid)
        data, spec, heldout, file_cid = _load_client(path, self.verify)
        meta_path = path / META_FILE
        if spec != self.spec:
            raise DataError(f"{meta_path}: spec differs from {self.root / DATASET_FILE}")
        if file_cid != int(cid):
            raise DataError(f"{meta_path}: client_id {file_cid}, but dataset.json lists this directory as client {cid}")
        if heldout != self._heldout[int(cid)]:
            raise DataError(f"{meta_path}: the client is a {heldout!r} client, dataset.json says {self._heldout[int(cid)]!r}")
        return data


@DATASETS.register("disk")
def make_disk(cfg) -> DiskDataset:
    """``data.dataset = "disk"``: partitions written by ``fedmeta partition`` under ``data.path``."""
    if not cfg.path:
        raise DataError("data.path: required when data.dataset = 'disk' (a directory written by `fedmeta partition`)")
    return DiskDataset(cfg.path, num_clients=cfg.num_clients)
