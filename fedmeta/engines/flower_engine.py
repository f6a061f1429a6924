"""``simulation.engine = "flower"``: the Engine object, in a module that loads no Flower.

Resolving the name (which every ``fedmeta simulate`` does before its first status line) must not cost Flower's and
Ray's import time; :meth:`FlowerEngine.run` loads :mod:`fedmeta.engines.flower` when the run starts.
"""

from __future__ import annotations

from pathlib import Path

from fedmeta.config import Config
from fedmeta.engines.base import Engine
from fedmeta.registry import ENGINES


@ENGINES.register("flower")
class FlowerEngine(Engine):
    """``simulation.engine = "flower"``: the project's ServerApp and ClientApp on Flower's Simulation Engine."""

    def clients_elsewhere(self, cfg: Config) -> str | None:
        return "simulation.engine: 'flower' runs clients in other processes"

    def run(self, cfg, components, out_dir, resume=False, progress=True, launched_at=None):
        from fedmeta.engines.flower import simulate_flower  # Flower and Ray load here, after the first status line

        return simulate_flower(cfg, Path(out_dir), resume=resume, progress=progress, launched_at=launched_at, components=components)
