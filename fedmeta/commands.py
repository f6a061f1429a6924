"""Registry of extra CLI sub-commands (privacy, partition, sweep, bench).

Each entry is a function ``register(subparsers)``; the modules register
themselves here so ``fedmeta.cli`` stays small.
"""

from __future__ import annotations

REGISTRY: list = []
