"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package that re-exports names from its modules would import all of them with itself.
The helper processes (livemig.migration.helper) import the few modules they use at the
start of every postcopy-capable migration, on the CPUs the migration needs; with
:func:`lazy_exports` a package imports a module the first time one of its names is
used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``where`` maps an exported name to the
    module that defines it."""

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
