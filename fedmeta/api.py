"""The Python API: run a federation from a notebook or a script.

    import fedmeta
    summary = fedmeta.simulate({"simulation": {"engine": "vectorized", "rounds": 20}},
                               model=my_factory, dataset=my_dataset, algorithm=MyAlgorithm)

``model``, ``dataset``, ``algorithm`` and ``engine`` take the same things the config keys
``model.factory``, ``data.dataset``, ``meta.algorithm`` and ``simulation.engine`` name, as objects:
a model factory ``(DatasetSpec, Config) -> nn.Module``; a dataset factory
``(DataConfig) -> FederatedDataset`` or a dataset object; a
:class:`~fedmeta.meta.MetaAlgorithm` subclass; an :class:`~fedmeta.engines.base.Engine`.
The objects themselves are passed down (:class:`fedmeta.components.Components`), never
through a string. ``config.json`` records an object importable as ``module:attr`` by that
reference (so the Flower engine's client processes and ``--resume`` can import it); one that
is not (defined in a notebook cell, a lambda) by a label ``"<local>:qualname"``: it runs in
this process only, on the sequential and vectorised engines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmeta.config import Config, build_config, load_config
from fedmeta.results import default_out_dir, prepare_out_dir, run_dir_lock


def _reference(obj: Any, key: str) -> str:
    """How ``config.json`` records ``obj``: ``module:qualname`` when that resolves back to it (not ``__main__``), else a
    readable label ``"<local>:qualname"`` (no string ever carries the object: it is passed down as itself)."""
    from fedmeta.registry import ComponentError, local_label, resolve

    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and module != "__main__" and "<" not in qualname:
        try:
            if resolve(f"{module}:{qualname}", key) is obj:
                return f"{module}:{qualname}"
        except ComponentError:
            pass
    return local_label(obj)


def simulate(
    config: Config | dict | str | Path | None = None,
    *,
    model: Any = None,
    dataset: Any = None,
    algorithm: Any = None,
    engine: Any = None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run one federation and return its summary (also written to ``out``, default ``runs/<timestamp>``).

    ``config``: a :class:`Config`, a nested dict, a TOML path, or None (built-in defaults);
    ``overrides``: ``"section.key=value"`` strings as with ``--set``. A directory that already
    holds a run is refused (``RunDirError``) unless ``overwrite=True``, as on the command line.
    ``model``, ``dataset``, ``algorithm``, ``engine``: objects (or config strings) for ``model.factory``,
    ``data.dataset``, ``meta.algorithm``, ``simulation.engine``; an object is used as it is.
    """
    if isinstance(config, Config):
        cfg = build_config(config.to_dict(), overrides)
    elif isinstance(config, (str, Path)):
        cfg = load_config(config, overrides)
    else:
        cfg = build_config(config, overrides)
    data = cfg.to_dict()
    given: dict[str, Any] = {}
    for name, obj, (section, key) in (("model", model, ("model", "factory")), ("dataset", dataset, ("data", "dataset")),
                                      ("algorithm", algorithm, ("meta", "algorithm")), ("engine", engine, ("simulation", "engine"))):
        if obj is None:
            continue
        if isinstance(obj, str):  # a config value, as in the config file
            data[section][key] = obj
        else:
            data[section][key] = _reference(obj, f"{section}.{key}")
            given[name] = obj
    cfg = build_config(data)
    from fedmeta.components import resolve_components

    components = resolve_components(cfg, **given)
    out_dir = Path(out or cfg.output.dir or default_out_dir())
    with run_dir_lock(out_dir, "out"):  # one process per run directory, taken before anything is written
        prepare_out_dir(out_dir, overwrite=overwrite, option="out")
        return run(cfg, out_dir, progress=progress, components=components)


def run(cfg: Config, out_dir: Path, resume: bool = False, progress: bool = True, components: Any = None) -> dict[str, Any]:
    """Run ``cfg`` with its engine (an object: :attr:`Components.engine`), writing into ``out_dir``; returns the summary.

    ``components``: the run's :class:`~fedmeta.components.Components`; None resolves ``cfg``'s (the CLI, ``--resume``).
    """
    import time

    from fedmeta.progress import status

    launched = time.time()
    if progress:  # first, before the imports and checks that take seconds (torch, Flower)
        status(f"{'resuming' if resume else 'starting'} a run: {cfg.meta.algorithm} on {cfg.data.num_clients} {cfg.data.dataset} clients, "
               f"{cfg.simulation.rounds} rounds, {cfg.simulation.engine} engine, into {out_dir}")
    if components is None:
        from fedmeta.components import resolve_components

        components = resolve_components(cfg)
    with run_dir_lock(out_dir, "out", create=not resume):  # re-entrant: already held when called by simulate / the CLI
        return components.engine.run(cfg, components, Path(out_dir), resume=resume, progress=progress, launched_at=launched)


def chance_of(spec: Any) -> float | None:
    """1 / num_classes for a classification spec, else None (:func:`fedmeta.engines.base.chance_of`)."""
    from fedmeta.engines.base import chance_of as chance

    return chance(spec)
