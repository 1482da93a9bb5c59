"""Directories that appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mantle_assets.storage import is_uri, remove, upload_directory

PARTIAL_PREFIX = ".partial-"


@contextlib.contextmanager
def removed_on_failure(path: Path | str) -> Iterator[None]:
    """Delete ``path`` (a local directory, or everything under a URI) if the block fails.

    Outputs must not outlive a failed record.
    """
    try:
        yield
    except BaseException:
        if is_uri(path):
            remove(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
        raise


UNRECORDED_SUFFIX = ".unrecorded"


@contextlib.contextmanager
def set_aside_on_failure(path: Path) -> Iterator[None]:
    """Rename ``path`` to ``<path>.unrecorded`` if the block fails, instead of deleting it.

    For outputs too costly to make again (an hour of model training) whose
    recording failed: nothing records or reads them, but a person can still
    use or inspect the files.
    """
    try:
        yield
    except BaseException as error:
        aside = path.with_name(path.name + UNRECORDED_SUFFIX)
        os.replace(path, aside)
        error.add_note(f"outputs kept, unrecorded, in {aside}")
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


@contextlib.contextmanager
def output_directory(final: Path | str, scratch: Path) -> Iterator[Path]:
    """Yield a local directory to fill that becomes ``final``, a local directory or a URI.

    A local ``final`` is an :func:`atomic_directory`. For a URI the outputs
    are written into an :func:`atomic_directory` at ``scratch`` (which must
    not exist) and, once complete, uploaded to ``final``; ``scratch`` is
    removed afterwards. If the upload fails, what it wrote is deleted.

    Object stores have no atomic rename: the upload appears object by object.
    ``final`` must therefore be a prefix that no other run writes (one per run
    id), and readers must learn of it only from the entity recorded after this
    block (wrap the record in :func:`removed_on_failure`): an unrecorded prefix
    is invisible to the platform, as a ``.partial-`` directory is.
    """
    if not is_uri(final):
        with atomic_directory(final) as partial:
            yield partial
        return
    try:
        with atomic_directory(scratch) as partial:
            yield partial
        with removed_on_failure(final):
            upload_directory(scratch, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
