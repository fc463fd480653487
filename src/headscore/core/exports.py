"""Lazy package exports: a package's `__init__` names its public API without importing its modules.

Importing `headscore.compression` (or any module in it) then costs nothing beyond the package itself, so the
CLI's `--help` does not wait for torch, and a package never imports a sibling module before it is needed
(no import cycles through `__init__` files).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[list[str], Callable[[str], Any]]:
    """`(__all__, __getattr__)` for `package`, whose `exports` map a module name (relative to the package) to
    the public names it defines; a name is imported from its module on first access (PEP 562)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{where[name]}"), name)

    return sorted(where), __getattr__
