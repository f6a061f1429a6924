"""``fedmeta partition``: write a config's clients to disk, one directory per client.

The directories are in the documented format of :mod:`fedmeta.data.disk`;
copy one to each SuperNode host and name it in ``--node-config partition-dir=...``.

Only the ``data`` and ``model`` sections are validated (nothing else is used).
The target must be empty or absent; ``--overwrite`` first clears a previous
partition there (``dataset.json`` and ``client_NNNNN/`` directories), and refuses
to touch a directory holding anything else.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from fedmeta.config import ConfigError

_PARTITION_ENTRY = re.compile(r"^(dataset\.json|client_\d{5,}|store\.json|x\.[\w-]+\.npy|(y|present|n|n_support|train|heldout|validation)\.npy)$")


def _prepare_target(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` (or clear a previous partition with ``overwrite``); nothing is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"partition --out {out}: exists and is not a directory")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ConfigError(
            f"partition --out {out}: directory is not empty ({len(entries)} entries, e.g. {entries[0]!r}); "
            "use --overwrite to replace a previous partition, or an empty directory"
        )
    foreign = [name for name in entries if not _PARTITION_ENTRY.match(name)]
    if foreign:
        raise ConfigError(
            f"partition --out {out}: --overwrite clears only a previous partition (dataset.json, client_NNNNN/, or a store's files), "
            f"but the directory also holds {foreign[0]!r}"
        )


def _check_not_source(out: Path, source: str) -> None:
    """Refuse an ``--out`` that is ``data.path``, lies inside it, or contains it (any format, any dataset):
    clearing or writing it would destroy the data being read."""
    if not source:
        return
    src, dst = Path(source).resolve(), out.resolve()
    if dst == src:
        raise ConfigError(f"partition --out {out}: is data.path, the dataset being read")
    if src in dst.parents:
        raise ConfigError(f"partition --out {out}: lies inside data.path={source}, the dataset being read")
    if dst in src.parents:
        raise ConfigError(f"partition --out {out}: contains data.path={source}, the dataset being read")


def _clear_partition(out: Path) -> None:
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def cmd_partition(args: argparse.Namespace) -> int:
    from fedmeta.config import load_sections
    from fedmeta.data import build_dataset
    from fedmeta.data.disk import write_partitions
    from fedmeta.data.store import write_store

    sections = load_sections(args.config, args.set, ("data", "model"))
    data, model = sections["data"], sections["model"]
    out = Path(args.out)
    _check_not_source(out, data.path)
    _prepare_target(out, args.overwrite)
    dataset = build_dataset(data, model.modalities)  # may raise DataError: still nothing written
    from fedmeta.data.base import validation_clients

    if args.format == "store":  # one .npy per array, written chunk by chunk (fedmeta/data/store.py)
        if args.overwrite:
            _clear_partition(out)
        root = write_store(dataset, out)
        print(f"wrote a store of {dataset.num_clients} clients ({len(dataset.heldout_clients)} test, "
              f"{len(validation_clients(dataset))} validation) to {root}")
        return 0
    clients = sorted(dataset.train_clients + dataset.heldout_clients + validation_clients(dataset))
    if args.overwrite:
        _clear_partition(out)
    root = write_partitions(dataset, out, clients=clients)
    print(f"wrote {len(clients)} client directories ({len(dataset.heldout_clients)} test, {len(validation_clients(dataset))} validation) to {root}")
    return 0


def register(sub) -> None:
    from fedmeta.cli import one_line_errors

    p = one_line_errors(sub.add_parser(
        "partition", help="write each client's partition to disk (for deployments and user data)",
        description="Writes dataset.json plus client_NNNNN/ per client (format: fedmeta/data/disk.py). "
                    "Only the data and model sections of the config are used and validated.",
    ))
    p.add_argument("--config", help="TOML config file (default: built-in defaults); its data/model sections are used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. data.num_clients=20 (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="root directory, absent or empty: dataset.json plus client_NNNNN/ per client")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous partition in --out (removes its dataset.json and client_NNNNN/ first)")
    p.add_argument("--format", choices=("dirs", "store"), default="dirs",
                   help="dirs: one directory per client (deployments; data.dataset='disk'); store: one memory-mapped "
                        ".npy per array for populations larger than RAM (data.dataset='store', vectorized engine)")
    p.set_defaults(func=cmd_partition)
