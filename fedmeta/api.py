"""The Python API: run a federation from a notebook or a script.

    import fedmeta
    summary = fedmeta.simulate({"simulation": {"engine": "vectorized", "rounds": 20}},
                               model=my_factory, dataset=my_dataset, algorithm=MyAlgorithm)

``model``, ``dataset`` and ``algorithm`` take the same things the config keys
``model.factory``, ``data.dataset`` and ``meta.algorithm`` name, as objects:
a model factory ``(DatasetSpec, Config) -> nn.Module``; a dataset factory
``(DataConfig) -> FederatedDataset`` or a dataset object; a
:class:`~fedmeta.meta.MetaAlgorithm` subclass. An object importable as
``module:attr`` is recorded by that reference (so ``config.json`` names it and
the Flower engine's client processes can import it); one that is not (defined
in a notebook cell, a lambda) runs in this process only, on the sequential and
vectorised engines.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from fedmeta.config import Config, ConfigError, build_config, load_config
from fedmeta.results import RunWriter, default_out_dir, prepare_out_dir, run_dir_lock

LOCAL = types.SimpleNamespace()  # objects handed to simulate() that have no importable reference
_LOCAL_PREFIX = "fedmeta.api:LOCAL."


def _reference(obj: Any, key: str) -> str:
    """``module:qualname`` when that resolves back to ``obj`` (and is not ``__main__``); else a process-local name."""
    if isinstance(obj, str):
        return obj
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qualname and module != "__main__" and "<" not in qualname:
        from fedmeta.components import ComponentError, resolve

        try:
            if resolve(f"{module}:{qualname}", key) is obj:
                return f"{module}:{qualname}"
        except ComponentError:
            pass
    name = f"{key.replace('.', '_')}_{id(obj):x}"
    setattr(LOCAL, name, obj)
    return _LOCAL_PREFIX + name


def _dataset_factory(dataset: Any) -> Any:
    if isinstance(dataset, str) or callable(dataset) and not hasattr(dataset, "client"):
        return dataset
    return lambda data_cfg, _ds=dataset: _ds  # a dataset object: the factory returns it


def simulate(
    config: Config | dict | str | Path | None = None,
    *,
    model: Any = None,
    dataset: Any = None,
    algorithm: Any = None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run one federation and return its summary (also written to ``out``, default ``runs/<timestamp>``).

    ``config``: a :class:`Config`, a nested dict, a TOML path, or None (built-in defaults);
    ``overrides``: ``"section.key=value"`` strings as with ``--set``. A directory that already
    holds a run is refused (``RunDirError``) unless ``overwrite=True``, as on the command line.
    """
    if isinstance(config, Config):
        cfg = build_config(config.to_dict(), overrides)
    elif isinstance(config, (str, Path)):
        cfg = load_config(config, overrides)
    else:
        cfg = build_config(config, overrides)
    data = cfg.to_dict()
    if model is not None:
        data["model"]["factory"] = _reference(model, "model.factory")
    if dataset is not None:
        data["data"]["dataset"] = _reference(_dataset_factory(dataset), "data.dataset")
    if algorithm is not None:
        data["meta"]["algorithm"] = _reference(algorithm, "meta.algorithm")
    cfg = build_config(data)
    local = [v for v in (cfg.model.factory, cfg.data.dataset, cfg.meta.algorithm) if v.startswith((_LOCAL_PREFIX, "__main__:"))]
    if local and cfg.simulation.engine == "flower":
        raise ConfigError(
            f"config error: simulation.engine: 'flower' runs clients in other processes, which cannot import {local[0]!r}; "
            "define it in a module and pass 'package.module:attr', or use engine 'sequential' or 'vectorized'"
        )
    if local and cfg.simulation.workers:
        raise ConfigError(
            f"config error: simulation.workers: Ray workers run in other processes, which cannot import {local[0]!r}; "
            "define it in a module and pass 'package.module:attr', or set simulation.workers = 0"
        )
    from fedmeta.components import check_components

    check_components(cfg)
    out_dir = Path(out or cfg.output.dir or default_out_dir())
    with run_dir_lock(out_dir, "out"):  # one process per run directory, taken before anything is written
        prepare_out_dir(out_dir, overwrite=overwrite, option="out")
        return run(cfg, out_dir, progress=progress)


def make_backend(cfg: Config, dataset):
    """The in-process backend the config names (the Flower engine runs through :mod:`fedmeta.engines.flower`)."""
    from fedmeta.engines.sequential import SequentialBackend
    from fedmeta.engines.vectorized import VectorizedBackend

    if cfg.simulation.engine == "vectorized" and cfg.simulation.workers:
        from fedmeta.engines.ray_cluster import RayVectorizedBackend

        return RayVectorizedBackend(cfg, dataset)
    return {"sequential": SequentialBackend, "vectorized": VectorizedBackend}[cfg.simulation.engine](cfg, dataset)


def run(cfg: Config, out_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` on its configured engine, writing into ``out_dir``; returns the summary."""
    import time

    from fedmeta.progress import status

    launched = time.time()
    if progress:  # first, before the imports and checks that take seconds (torch, Flower)
        status(f"{'resuming' if resume else 'starting'} a run: {cfg.meta.algorithm} on {cfg.data.num_clients} {cfg.data.dataset} clients, "
               f"{cfg.simulation.rounds} rounds, {cfg.simulation.engine} engine, into {out_dir}")
    from fedmeta.components import check_components

    check_components(cfg)
    with run_dir_lock(out_dir, "out", create=not resume):  # re-entrant: already held when called by simulate / the CLI
        return _run(cfg, Path(out_dir), resume, progress, launched)


def _run(cfg: Config, out_dir: Path, resume: bool, progress: bool, launched: float) -> dict[str, Any]:
    from fedmeta.client import configure_torch, model_for
    from fedmeta.progress import round_printer, status

    if cfg.simulation.engine == "flower":
        from fedmeta.engines.flower import simulate_flower

        return simulate_flower(cfg, out_dir, resume=resume, progress=progress, launched_at=launched)

    from fedmeta.data import build_dataset
    from fedmeta.federation import run_federation
    from fedmeta.meta.algorithm import algorithm_for, initial_meta_parameters

    if progress:
        status(f"building the population: {cfg.data.num_clients} clients of dataset {cfg.data.dataset!r} ({cfg.simulation.engine} engine)")
    dataset = build_dataset(cfg.data, cfg.model.modalities)
    backend = make_backend(cfg, dataset)
    configure_torch(1)
    theta0 = initial_meta_parameters(model_for(cfg, dataset.spec), algorithm_for(cfg))
    show = round_printer(cfg.simulation.rounds, chance=chance_of(dataset.spec)) if progress else None
    if progress:
        status(f"population built; round 1 of {cfg.simulation.rounds} starts")
    try:
        return run_federation(cfg, backend, theta0, RunWriter(out_dir), resume=resume, progress=show, launched_at=launched)
    finally:
        if show is not None:
            show.close()
        close = getattr(backend, "close", None)  # the Ray workers' backend stops its actors (and its private Ray)
        if close is not None:
            close()


def chance_of(spec: Any) -> float | None:
    """1 / num_classes for a classification spec, else None."""
    return 1.0 / spec.num_classes if spec is not None and spec.task == "classification" and spec.num_classes > 0 else None
