"""What ``simulation.engine`` names: an :class:`Engine` object, registered by name (:data:`fedmeta.registry.ENGINES`).

The built-ins register themselves (``sequential``, ``vectorized``, ``flower``); a user's engine is the same::

    from fedmeta.engines.base import InProcessEngine
    from fedmeta.registry import ENGINES

    @ENGINES.register("mine")
    class Mine(InProcessEngine):
        def backend(self, cfg, components):
            return MyBackend(cfg, components)  # populations(), train(), evaluate(): see fedmeta.federation.Backend

and ``simulation.engine = "my_module:mine"`` (or ``"my_module:Mine"``) runs it. :func:`fedmeta.api.run` calls
``engine.run(cfg, components, out_dir, ...)`` on the resolved object and never looks at the engine's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmeta.components import Components
    from fedmeta.config import Config


class Engine(ABC):
    """Runs a whole federation of the resolved components and returns its summary."""

    name: str = ""

    def clients_elsewhere(self, cfg: "Config") -> str | None:
        """``"key: why"`` when this engine runs clients in other processes (which rebuild the components from the
        config, so an object without an importable reference cannot go there), else None (in this process)."""
        return None

    @abstractmethod
    def run(self, cfg: "Config", components: "Components", out_dir: Path, resume: bool = False, progress: bool = True,
            launched_at: float | None = None) -> dict[str, Any]:
        """Run ``cfg`` with ``components`` into ``out_dir`` (resuming its checkpoint with ``resume``); the summary."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class InProcessEngine(Engine):
    """An engine whose backend runs in this process: the shared round loop (:func:`fedmeta.federation.run_federation`)
    over :meth:`backend`, from theta_0 of the components' model and algorithm."""

    @abstractmethod
    def backend(self, cfg: "Config", components: "Components") -> Any:
        """The backend that runs a round's clients (``populations``, ``train``, ``evaluate``; optional ``close``)."""

    def run(self, cfg, components, out_dir, resume=False, progress=True, launched_at=None):
        from fedmeta.client import configure_torch
        from fedmeta.federation import run_federation
        from fedmeta.meta.algorithm import initial_meta_parameters
        from fedmeta.progress import round_printer, status
        from fedmeta.results import RunWriter

        if progress:
            status(f"building the population: {cfg.data.num_clients} clients of dataset {cfg.data.dataset!r} ({cfg.simulation.engine} engine)")
        dataset = components.dataset()
        backend = self.backend(cfg, components)
        configure_torch(1)
        theta0 = initial_meta_parameters(components.model(dataset.spec), components.algorithm)
        show = round_printer(cfg.simulation.rounds, chance=chance_of(dataset.spec)) if progress else None
        if progress:
            status(f"population built; round 1 of {cfg.simulation.rounds} starts")
        try:
            return run_federation(cfg, backend, theta0, RunWriter(Path(out_dir)), resume=resume, progress=show, launched_at=launched_at,
                                  algorithm=components.algorithm)
        finally:
            if show is not None:
                show.close()
            close = getattr(backend, "close", None)  # the Ray workers' backend stops its actors (and its private Ray)
            if close is not None:
                close()


def chance_of(spec: Any) -> float | None:
    """1 / num_classes for a classification spec, else None."""
    return 1.0 / spec.num_classes if spec is not None and spec.task == "classification" and spec.num_classes > 0 else None
