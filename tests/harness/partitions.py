"""Small on-disk partitions for tests: a valid population with one client broken on purpose."""

from __future__ import annotations

import json
from pathlib import Path

from fedmeta.config import Config, build_config
from fedmeta.data import build_dataset
from fedmeta.data.disk import write_partitions


def disk_without_a_query_set(root: Path, overrides: list[str]) -> tuple[Config, int]:
    """Partitions of ``overrides``' population under ``root / "p"`` whose first training client has
    ``n_support == n`` (no query set: the disk format allows it, a run must refuse it); the config that
    reads them, and that client's id."""
    cfg = build_config(None, overrides)
    ds = build_dataset(cfg.data)
    write_partitions(ds, root / "p")
    cid = ds.train_clients[0]
    meta = root / "p" / f"client_{cid:05d}" / "meta.json"
    doc = json.loads(meta.read_text())
    doc["n_support"] = doc["n"]
    meta.write_text(json.dumps(doc))
    return build_config(None, [*overrides, "data.dataset=disk", f"data.path={root / 'p'}"]), cid
