"""``fedmeta partition``: write a config's clients to disk, one directory per client.

The directories are in the documented format of :mod:`fedmeta.data.disk`;
copy one to each SuperNode host and name it in ``--node-config partition-dir=...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_partition(args: argparse.Namespace) -> int:
    from fedmeta.config import load_config
    from fedmeta.data import build_dataset
    from fedmeta.data.disk import write_partitions

    cfg = load_config(args.config, args.set)
    dataset = build_dataset(cfg.data, cfg.model.modalities)
    clients = sorted(dataset.train_clients + dataset.heldout_clients)
    root = write_partitions(dataset, Path(args.out), clients=clients)
    print(f"wrote {len(clients)} client directories ({len(dataset.heldout_clients)} held out) to {root}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("partition", help="write each client's partition to disk (for deployments and user data)")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="root directory: dataset.json plus client_NNNNN/ per client")
    p.set_defaults(func=cmd_partition)
