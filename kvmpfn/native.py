"""Compiled or pure Python: which copy of the simulator's packages Python imports.

An install compiles kvm/, host/ and audit/ to C extensions with mypyc, and trace/_unhex.c (setup.py), and
records each source's SHA-256 in ``kvmpfn/_compiled_sources.py`` (docs/architecture.md, Compiled modules). The
packages are imported from their ``.py`` sources when ``KVMPFN_PURE=1`` is set, or when a source changed since
it was compiled: an edited checkout then runs the code as it reads, only slower, until it is built again (the
reader then also uses the Python twin of ``_unhex``, kvmpfn/trace/unhex.py).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

ROOT = os.path.dirname(os.path.abspath(__file__))


class _FromSource(importlib.abc.MetaPathFinder):
    """Imports every module of the compiled packages from its ``.py`` file, before the extension is found."""

    def __init__(self, packages: frozenset[str]) -> None:
        self.packages = packages

    def find_spec(self, name: str, path: object = None, target: ModuleType | None = None) -> ModuleSpec | None:
        parts = name.split(".")
        if len(parts) < 2 or parts[0] != "kvmpfn" or parts[1] not in self.packages:
            return None
        base = os.path.join(ROOT, *parts[1:])
        if os.path.isdir(base):
            return importlib.util.spec_from_file_location(
                name, os.path.join(base, "__init__.py"), submodule_search_locations=[base]
            )
        return importlib.util.spec_from_file_location(name, base + ".py")


def _choose() -> tuple[str, str | None]:
    """(mode, why): ``compiled``, or ``pure`` with the reason when compiled modules exist but are not used."""
    try:
        from kvmpfn._compiled_sources import SOURCES
    except ImportError:
        return "pure", None  # installed without compiling (KVMPFN_PURE_PYTHON=1), or a source tree
    packages = frozenset(rel.split("/")[0] for rel in SOURCES if rel.endswith(".py"))
    if os.environ.get("KVMPFN_PURE"):
        why = None  # asked for
    else:
        changed = [f"{rel} changed since it was compiled" for rel, digest in SOURCES.items() if _digest(rel) != digest]
        added = [f"{rel} is new since the build" for rel in _sources(packages) if rel not in SOURCES]
        if not changed and not added:
            return "compiled", None
        why = (changed + added)[0]
    sys.meta_path.insert(0, _FromSource(packages))
    return "pure", why


def _sources(packages: frozenset[str]) -> list[str]:
    """The ``.py`` files of ``packages`` now, relative to the package (``kvm/mmu.py``)."""
    names = ((pkg, name) for pkg in packages for name in os.listdir(os.path.join(ROOT, pkg)))
    return sorted(f"{pkg}/{name}" for pkg, name in names if name.endswith(".py"))


def _digest(rel: str) -> str | None:
    try:
        with open(os.path.join(ROOT, rel), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


#: ``compiled`` or ``pure``; STALE says why compiled modules were set aside (None: they were not)
MODE, STALE = _choose()
