"""User components named in a config as ``"package.module:attr"``, resolved as Flower resolves app components.

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

import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Any

from fedmeta.config import ConfigError

REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


from fedmeta.errors import ComponentError  # noqa: E402,F401 - defined in fedmeta.errors


def is_reference(value: str) -> bool:
    return bool(REFERENCE.match(value))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def raised(key: str, reference: str, err: BaseException) -> ComponentError:
    """The one-line error for a user's component (named ``reference`` under config ``key``) that raised ``err``."""
    return ComponentError(f"config error: {key}: {reference!r} raised {_first_line(err)}")


def _allow_cwd_for(module_name: str) -> None:
    """Append the cwd to ``sys.path`` if ``module_name``'s top-level module is found there and nowhere else."""
    top = module_name.partition(".")[0]
    if top in sys.modules:
        return
    try:
        if importlib.util.find_spec(top) is not None:
            return  # installed (or on the path the user gave): never shadowed by the cwd
    except (ImportError, ValueError):
        return  # let import_module report it
    cwd = os.getcwd()
    if importlib.machinery.PathFinder.find_spec(top, [cwd]) is not None and cwd not in sys.path:
        sys.path.append(cwd)
        importlib.invalidate_caches()


def resolve(reference: str, key: str) -> Any:
    """``"package.module:attr"`` (``attr`` may be dotted) -> the object."""
    if not is_reference(reference):
        raise ComponentError(f"config error: {key}: expected 'package.module:attr' (got {reference!r})")
    module_name, _, attr = reference.partition(":")
    _allow_cwd_for(module_name)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - a user's module may raise anything on import
        raise ComponentError(f"config error: {key}: cannot import {module_name!r} ({_first_line(err)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ComponentError(f"config error: {key}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def check_components(cfg) -> None:
    """Resolve every component a config names (model factory, dataset, algorithm); raise one line on the first bad one."""
    from fedmeta.data import resolve_dataset_factory
    from fedmeta.meta.algorithm import algorithm_for
    from fedmeta.models import resolve_model_factory

    resolve_model_factory(cfg.model.factory)
    resolve_dataset_factory(cfg.data.dataset)
    algorithm_for(cfg)  # resolves, instantiates and runs the method's own check_config
