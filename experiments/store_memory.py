"""Peak RSS and wall time of building the vectorised engine's ClientStore for a config's training population
(docs/benchmarks.md section 7: LEAF Shakespeare at full scale).

    python -m experiments.store_memory [--config experiments/configs/shakespeare.toml] [--store-from FILE]

``--store-from`` takes the ``ClientStore`` from another copy of ``fedmeta/engines/vectorized.py`` (e.g. the
padded store before the ragged one: ``git show 1bcaf3d:fedmeta/engines/vectorized.py > old.py``); run that
under ``ulimit -v`` on a shared machine. Clients are built one at a time; an allocation the machine refuses
ends the build with the clients built so far. Prints one JSON line. CPU- and memory-heavy: run it once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time


def store_class(path: str | None):
    if path is None:
        from fedmeta.engines.vectorized import ClientStore

        return ClientStore
    spec = importlib.util.spec_from_file_location("store_memory_other", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.ClientStore


def measure(config: str, store_from: str | None) -> dict:
    from fedmeta.config import load_config
    from fedmeta.data import build_dataset

    dataset = build_dataset(load_config(config).data)
    cids = list(dataset.train_clients)
    ClientStore = store_class(store_from)
    start = time.perf_counter()
    store, error, built = ClientStore(dataset), None, 0
    for cid in cids:
        try:
            store.ensure([cid])
        except (RuntimeError, MemoryError) as err:  # DefaultCPUAllocator: can't allocate memory
            error = f"client {built + 1} of {len(cids)}: {str(err).splitlines()[0][:200]}"
            break
        built += 1
    wall = time.perf_counter() - start
    fields = [v for v in (*store.x.values(), store.y, store.present) if v is not None]
    return {
        "store": store_from or "fedmeta.engines.vectorized", "clients": len(cids), "built": built,
        "rows_of_built_clients": int(store.n[cids[:built]].sum()),
        "allocated_elements": sum(v.numel() for v in fields),
        "allocated_GB": round(sum(v.numel() * v.element_size() for v in fields) / 1e9, 3),
        "wall_s": round(wall, 2), "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "error": error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/shakespeare.toml")
    parser.add_argument("--store-from", default=None, help="another vectorized.py to take ClientStore from")
    args = parser.parse_args(argv)
    from fedmeta.errors import FedmetaError

    try:
        result = measure(args.config, args.store_from)
    except (FedmetaError, OSError, AttributeError) as err:  # a bad --config / --store-from: one line, exit 2
        print(f"store_memory: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
