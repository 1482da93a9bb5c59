"""Importing Cellpose with its numba-compiled functions cached on disk.

``cellpose.dynamics`` compiles its numba functions (declared with explicit
signatures) while it is imported, in every process: several seconds of CPU per
run, which the Cellpose CLI pays on every call too. Numba caches machine code
only for functions declared with ``cache=True``, which Cellpose's are not.
Importing Cellpose while numba's decorators default to ``cache=True`` makes
every later process load the compiled code instead. Numba keys its cache on
the source file and the CPU, so a Cellpose upgrade recompiles.
"""

from __future__ import annotations

import importlib
import os
import sys

from mantle_assets.settings import mantle_home

# Cellpose's modules that decorate functions with numba.njit / numba.jit.
NUMBA_MODULES = ("cellpose.dynamics", "cellpose.metrics")


def _caching(decorator):
    def decorate(*args, **kwargs):
        kwargs.setdefault("cache", True)
        return decorator(*args, **kwargs)

    return decorate


def import_cellpose() -> None:
    """Import Cellpose's numba-using modules with compiled-code caching on.

    Call it before importing anything from ``cellpose``; once those modules
    are imported it does nothing. The cache lives in ``$NUMBA_CACHE_DIR``,
    or ``$MANTLE_HOME/numba-cache`` when that is unset (a read-only
    ``site-packages`` cannot hold it).
    """
    if all(name in sys.modules for name in NUMBA_MODULES):
        return
    import numba

    if not os.environ.get("NUMBA_CACHE_DIR"):
        numba.config.CACHE_DIR = str(mantle_home() / "numba-cache")
    plain = numba.njit, numba.jit
    numba.njit, numba.jit = _caching(numba.njit), _caching(numba.jit)
    try:
        for name in NUMBA_MODULES:
            importlib.import_module(name)
    finally:
        numba.njit, numba.jit = plain
