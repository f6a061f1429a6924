"""Extra CLI sub-commands, each defined next to what it drives.

Every module listed here has ``register(subparsers)``; importing is deferred
until the parser is built.
"""

from __future__ import annotations

import importlib

MODULES = ("fedmeta.privacy.cli", "fedmeta.data.cli", "fedmeta.bench", "fedmeta.sweep", "fedmeta.plot")


def register_all(subparsers) -> None:
    done = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not an absent optional command
                raise
            continue
        if module.register not in done:
            module.register(subparsers)
            done.append(module.register)
