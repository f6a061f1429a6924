"""The run's components, resolved once: model factory, dataset, algorithm and engine, as objects.

:func:`resolve_components` is called once at the top of every run (the CLI, :func:`fedmeta.simulate`,
the ServerApp, the ClientApp, a Ray worker, the protocol): it takes each component from the objects it is
given (``fedmeta.simulate(model=..., dataset=..., algorithm=..., engine=...)``) or resolves the config's
value through its registry (:mod:`fedmeta.registry`: a registered name or ``"package.module:attr"``), and
returns a :class:`Components` bundle that the engines, the round loop and the clients get as an object.
Nothing below it resolves a config string again.

A reference is imported from installed packages (the standard library and
``sys.path`` as Python set it up) or, for the user's own code, from the current
working directory: only when the reference's top-level module is not
importable otherwise and *is* in the cwd, the cwd is *appended* to
``sys.path`` (after the standard library and installed packages, so a
``sympy.py`` or ``rich.py`` planted there is never imported in their place;
Ray's workers inherit the entry and find the user's modules too).
Anything that goes wrong becomes a one-line :class:`ComponentError` naming
the config key and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from fedmeta.errors import ComponentError
from fedmeta.registry import REFERENCE, is_local, is_reference, raised, resolve  # noqa: F401 - re-exported (fedmeta.components.resolve ...)

if TYPE_CHECKING:
    from fedmeta.config import Config
    from fedmeta.engines.base import Engine
    from fedmeta.meta.algorithm import MetaAlgorithm

__all__ = ["REFERENCE", "ComponentError", "Components", "check_components", "is_reference", "raised", "resolve", "resolve_components"]


@dataclass
class Components:
    """What a run uses, as objects: built by :func:`resolve_components`, handed down to engines and clients.

    ``model_factory(spec, cfg) -> nn.Module``; ``dataset_factory(data_cfg) -> FederatedDataset`` (the dataset
    itself is built on first use, :meth:`dataset`); ``algorithm``: the run's :class:`~fedmeta.meta.MetaAlgorithm`
    instance; ``engine``: the :class:`~fedmeta.engines.base.Engine` that runs it. ``local``: the config keys whose
    object has no importable reference (recorded as ``"<local>:name"``; other processes cannot use them).
    """

    cfg: "Config"
    model_factory: Callable[..., Any]
    dataset_factory: Callable[..., Any]
    algorithm: "MetaAlgorithm"
    engine: "Engine | None"
    local: tuple[str, ...] = ()
    _dataset: Any = field(default=None, repr=False)

    def dataset(self):
        """The run's dataset (``data.*`` checks and wrappers applied, :func:`fedmeta.data.build_dataset`), built once."""
        if self._dataset is None:
            from fedmeta.data import build_dataset

            self._dataset = build_dataset(self.cfg.data, self.cfg.model.modalities, factory=self.dataset_factory)
        return self._dataset

    def with_dataset(self, dataset) -> "Components":
        """The same components (the same algorithm object) around a built dataset object, used as it is."""
        return replace(self, _dataset=dataset)

    def model(self, spec):
        """A fresh model for ``spec`` from the model factory, seeded from ``simulation.seed``, accepted by the algorithm."""
        from fedmeta.client import model_for

        return model_for(self.cfg, spec, self)


def _callable(obj: Any, key: str, value: str) -> Any:
    if not callable(obj):
        raise ComponentError(f"config error: {key}: {value!r} is not callable")
    return obj


def _engine(obj: Any, value: str) -> "Engine":
    from fedmeta.engines.base import Engine

    if isinstance(obj, type) and issubclass(obj, Engine):
        try:
            obj = obj()
        except Exception as err:  # noqa: BLE001 - a user's __init__ may raise anything
            raise raised("simulation.engine", value, err) from None
    if not isinstance(obj, Engine):
        raise ComponentError(f"config error: simulation.engine: {value!r} is not a fedmeta.engines.base.Engine (got {obj!r})")
    return obj


def resolve_components(cfg: "Config", *, model: Any = None, dataset: Any = None, algorithm: Any = None, engine: Any = None,
                       with_engine: bool = True) -> Components:
    """The run's :class:`Components`: the objects given, else what the config names (one line on the first bad one).

    ``dataset`` may be a factory or a dataset object (its factory returns it); ``algorithm`` a
    :class:`~fedmeta.meta.MetaAlgorithm` subclass; ``engine`` an :class:`~fedmeta.engines.base.Engine` (class or instance).
    An engine whose clients run in other processes refuses a component recorded as ``"<local>:..."``.
    ``with_engine=False``: a client process of an engine (the ClientApp, a Ray worker) needs no engine (None).
    """
    from fedmeta.meta.algorithm import build_algorithm, resolve_algorithm
    from fedmeta.registry import DATASETS, ENGINES, MODELS

    c = cfg
    model_factory = _callable(MODELS.resolve(c.model.factory) if model is None else model, "model.factory", c.model.factory)
    if dataset is None:
        dataset_factory = _callable(DATASETS.resolve(c.data.dataset), "data.dataset", c.data.dataset)
    else:
        dataset_factory = dataset if callable(dataset) and not hasattr(dataset, "client") else (lambda data_cfg, _ds=dataset: _ds)
    algo = build_algorithm(c, resolve_algorithm(c.meta.algorithm) if algorithm is None else algorithm)
    eng = _engine(ENGINES.resolve(c.simulation.engine) if engine is None else engine, c.simulation.engine) if with_engine else None
    local = tuple(k for k, v in (("model.factory", c.model.factory), ("data.dataset", c.data.dataset),
                                 ("meta.algorithm", c.meta.algorithm), ("simulation.engine", c.simulation.engine)) if is_local(v))
    if local and eng is not None:
        why = eng.clients_elsewhere(c)
        if why is not None:
            key, _, reason = why.partition(": ")
            value = getattr(getattr(c, local[0].split(".")[0]), local[0].split(".")[1])
            raise ComponentError(
                f"config error: {key}: {reason}, which cannot use {local[0]} = {value!r} (no importable reference); "
                "define it in a module and pass 'package.module:attr'" + (", or use engine 'sequential' or 'vectorized'" if key == "simulation.engine" else ", or set simulation.workers = 0")
            )
    return Components(c, model_factory, dataset_factory, algo, eng, local)


def components_of(cfg: "Config", given: Any, with_engine: bool = False) -> Components:
    """``given`` if it is the run's :class:`Components`; a built dataset (a script's or a test's backend): ``cfg``'s
    components around that dataset object, used as it is."""
    if isinstance(given, Components):
        return given
    return resolve_components(cfg, dataset=given, with_engine=with_engine).with_dataset(given)


def check_components(cfg: "Config") -> Components:
    """Resolve every component a config names (model factory, dataset, algorithm, engine); raise one line on the first bad one."""
    return resolve_components(cfg)
