"""Directories that appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

PARTIAL_PREFIX = ".partial-"


@contextlib.contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """Delete ``path`` if the block fails: outputs must not outlive a failed record."""
    try:
        yield
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a hidden sibling directory to fill; rename it to ``final`` on success.

    On an exception the partial directory is removed and ``final`` never
    appears. The rename is atomic because both paths share a parent.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise FileExistsError(f"output directory already exists: {final}")
    partial = final.parent / f"{PARTIAL_PREFIX}{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):  # only succeeds when no other run has output there
            final.parent.rmdir()
        raise
