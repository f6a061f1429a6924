"""Registries the config trusts: methods, datasets, engines and model factories, by name (no torch here).

Each config key that names a component (``meta.algorithm``, ``data.dataset``, ``simulation.engine``,
``model.factory``) takes the same three things, resolved by one code path (:meth:`Registry.resolve`):

* a **registered name** (``"reptile"``, ``"synthetic"``, ``"vectorized"``): the built-ins are registered by
  their own modules (``@METHODS.register("reptile")``), which the registry imports only when it needs them;
  a user's module registers its own names the same way;
* ``"package.module:attr"``: ``attr`` is the object itself, or a name that module registers;
* an object given to :func:`fedmeta.simulate` that cannot be imported again (a lambda, a notebook cell's
  class) is recorded in ``config.json`` under a readable label, ``"<local>:qualname"``, which nothing
  resolves: ``fedmeta resume`` and the Flower engine refuse it with one line.

:mod:`fedmeta.config` checks only the *syntax* of these values (:func:`check_syntax`); *which* names exist is
checked when the components are resolved (:func:`fedmeta.components.resolve_components`), one line naming
the key and listing the registered names.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Any, Callable

from fedmeta.errors import ComponentError

REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
NAME = re.compile(r"^[A-Za-z_][\w-]*$")
LOCAL_PREFIX = "<local>:"  # the prefix of an object's label when it has no importable reference


def is_reference(value: str) -> bool:
    return bool(REFERENCE.match(value))


def is_local(value: str) -> bool:
    """A label recorded for an object given to ``fedmeta.simulate`` that cannot be re-imported."""
    return value.startswith(LOCAL_PREFIX) and len(value) > len(LOCAL_PREFIX) and "\n" not in value


def local_label(obj: Any) -> str:
    """``"<local>:qualname"`` of an object (a dataset object: its class's name and ``object``)."""
    qualname = getattr(obj, "__qualname__", None) or f"{type(obj).__qualname__} object"
    return LOCAL_PREFIX + " ".join(str(qualname).split())[:120]


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


def refuse_local(key: str, value: str) -> ComponentError:
    return ComponentError(
        f"config error: {key}: {value!r} was an object given to fedmeta.simulate() in the process that ran it and cannot be "
        f"imported again; pass it again (fedmeta.simulate(..., {key.split('.')[-1]}=...)) or define it in a module and name it as 'package.module:attr'"
    )


class Registry:
    """Named components of one kind (``kind``), valid under the config key ``key``.

    ``builtin_modules``: the modules whose ``@register``\\ s are fedmeta's built-ins, imported on first need.
    ``hint``: what a reference names, for the error message (``package.module:Name``).
    ``on_register``: called with ``(name, obj)`` on registration (the methods set ``cls.name``).
    """

    def __init__(self, kind: str, key: str, builtin_modules: tuple[str, ...], hint: str = "package.module:attr",
                 on_register: Callable[[str, Any], None] | None = None) -> None:
        self.kind, self.key, self.hint = kind, key, hint
        self.builtin_modules = builtin_modules
        self.entries: dict[str, Any] = {}
        self.origin: dict[str, str] = {}  # name -> the module that registered it
        self.on_register = on_register
        self._loaded = False

    def register(self, name: str):
        """Decorator: ``@REGISTRY.register("name")`` makes the object valid as ``<key> = "name"``."""
        if not NAME.match(name):
            raise ValueError(f"{self.key}: a registered name must match {NAME.pattern} (got {name!r})")
        caller = sys._getframe(1).f_globals.get("__name__", "")

        def deco(obj: Any) -> Any:
            if caller not in self.builtin_modules:
                self._load_builtins()  # the built-in names are taken first, whatever the import order
            known = self.origin.get(name)
            # the same module may register again (a reload; a script run as __main__ and imported by name), another may not
            again = "__main__" in (known, caller) and getattr(self.entries.get(name), "__qualname__", None) == getattr(obj, "__qualname__", "")
            if name in self.entries and known != caller and not again:
                raise ValueError(f"{self.key}: {name!r} is already registered by {known or 'another module'}; choose another name")
            if self.on_register is not None:
                self.on_register(name, obj)
            self.entries[name] = obj
            self.origin[name] = caller
            return obj

        return deco

    def _load_builtins(self) -> None:
        if not self._loaded:
            for module in self.builtin_modules:
                importlib.import_module(module)
            self._loaded = True

    def names(self) -> tuple[str, ...]:
        """Every registered name: the built-ins, and any a user's module registered (once imported)."""
        self._load_builtins()
        rank = {m: i for i, m in enumerate(self.builtin_modules)}  # the built-ins in their modules' order, then the others
        return tuple(sorted(self.entries, key=lambda n: rank.get(self.origin.get(n, ""), len(rank))))

    def builtin_names(self) -> tuple[str, ...]:
        """The names fedmeta's own modules register."""
        return tuple(n for n in self.names() if self.origin.get(n) in self.builtin_modules)

    def is_builtin(self, obj: Any) -> bool:
        """Whether ``obj`` is registered by one of fedmeta's own modules."""
        return any(o is obj and self.origin.get(n) in self.builtin_modules for n, o in self.entries.items())

    def get(self, name: str) -> Any:
        """The object registered as ``name``; one line listing the registered names otherwise."""
        for module in self.builtin_modules:  # in order, only as far as needed (the Flower engine imports flwr)
            if name in self.entries:
                break
            importlib.import_module(module)
        if name in self.entries:
            return self.entries[name]
        listed = ", ".join(repr(n) for n in self.names())
        raise ComponentError(f"config error: {self.key}: must be one of {listed} or a '{self.hint}' reference (got {name!r})")

    def resolve(self, value: str) -> Any:
        """A registered name, ``"package.module:attr"`` (the object, or a name that module registers) -> the object."""
        if is_local(value):
            raise refuse_local(self.key, value)
        if not is_reference(value):
            return self.get(value)
        module_name, _, attr = value.partition(":")
        try:
            return resolve(value, self.key)
        except ComponentError:
            if module_name in sys.modules and attr in self.entries:  # the module imported fine and registered that name
                return self.entries[attr]
            raise

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.key!r})"


def check_syntax(value: str, kind: str, example: str, hint: str) -> str:
    """For :mod:`fedmeta.config`: a registered name's shape, a reference or a local label (which exist: checked later)."""
    if NAME.match(value) or is_reference(value) or is_local(value):
        return value
    text = " ".join(repr(value).split())
    text = text if len(text) <= 80 else text[:77] + "..."
    raise ValueError(f"must be a registered {kind} name (e.g. {example!r}) or a '{hint}' reference (got {text})")


def _name_the_class(name: str, cls: Any) -> None:
    cls.name = name


#: ``meta.algorithm``: :class:`fedmeta.meta.MetaAlgorithm` subclasses (``fedmeta.meta.register`` is ``METHODS.register``).
METHODS = Registry("method", "meta.algorithm", (
    "fedmeta.meta.algorithm", "fedmeta.meta.metasgd", "fedmeta.meta.perfedavg", "fedmeta.meta.ditto", "fedmeta.meta.fedrep",
    "fedmeta.meta.scaffold", "fedmeta.meta.protonet",
), hint="package.module:Name", on_register=_name_the_class)
#: ``data.dataset``: dataset factories ``(DataConfig) -> FederatedDataset``.
DATASETS = Registry("dataset", "data.dataset", (
    "fedmeta.data.synthetic", "fedmeta.data.avdigits", "fedmeta.data.sine", "fedmeta.data.disk", "fedmeta.data.store",
), hint="package.module:callable")
#: ``simulation.engine``: :class:`fedmeta.engines.base.Engine` subclasses or instances.
ENGINES = Registry("engine", "simulation.engine", (
    "fedmeta.engines.sequential", "fedmeta.engines.vectorized", "fedmeta.engines.flower_engine",
), hint="package.module:Engine")
#: ``model.factory``: model factories ``(DatasetSpec, Config) -> nn.Module``.
MODELS = Registry("model factory", "model.factory", ("fedmeta.models",), hint="package.module:callable")
