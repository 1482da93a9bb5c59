"""Where Mantle keeps its state, read from the environment at call time."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mantle_assets.storage import is_uri, normalised_uri

DEFAULT_MANTLE_HOME = ".mantle"


def mantle_home() -> Path:
    """``$MANTLE_HOME`` (default ``./.mantle``) as an absolute path."""
    return Path(os.environ.get("MANTLE_HOME", DEFAULT_MANTLE_HOME)).expanduser().resolve()


def dagster_home() -> Path:
    """``$DAGSTER_HOME``, or ``$MANTLE_HOME/dagster`` so the CLI and UI share one instance."""
    configured = os.environ.get("DAGSTER_HOME")
    return Path(configured).expanduser().resolve() if configured else mantle_home() / "dagster"


def mask_root() -> Path | str:
    """Where segmentation outputs are written: ``$MANTLE_MASK_ROOT``, else ``$MANTLE_HOME/masks``.

    ``MANTLE_MASK_ROOT`` may be a local folder or a URI (``s3://lab/masks``),
    returned normalised (see :func:`mantle_assets.storage.normalised_uri`).
    """
    configured = os.environ.get("MANTLE_MASK_ROOT", "").strip()
    if not configured:
        return mantle_home() / "masks"
    if is_uri(configured):
        return normalised_uri(configured)
    return Path(configured).expanduser().resolve()


def staging_root() -> Path:
    """Where runs keep local copies of URI directories while they read them: ``$MANTLE_HOME/staging``."""
    return mantle_home() / "staging"


DEFAULT_PLATES_PER_RUN = 8


def positive_integer_setting(name: str, default: int) -> int:
    """An environment variable that must be a positive integer.

    Raises
    ------
    ValueError
        One line naming the variable when it is set to anything else.
    """
    configured = os.environ.get(name, "").strip() or str(default)
    if not configured.isdigit() or int(configured) < 1:
        raise ValueError(f"{name} must be a positive integer, not {configured!r}")
    return int(configured)


def plates_per_run() -> int:
    """How many image directories one run of a backfill segments: ``$MANTLE_PLATES_PER_RUN`` (default 8).

    A run loads the model and starts its process (or pod) once for all of them.
    """
    return positive_integer_setting("MANTLE_PLATES_PER_RUN", DEFAULT_PLATES_PER_RUN)


def gpu_count() -> int:
    """GPUs the platform may use at once, the ``gpu`` pool's limit: ``$MANTLE_GPUS`` (default 1)."""
    return positive_integer_setting("MANTLE_GPUS", 1)


MAX_FIELD_PIXELS_ENV = "MANTLE_MAX_FIELD_PIXELS"


def max_field_pixels() -> int:
    """The most pixels one channel plane of an image may have: ``$MANTLE_MAX_FIELD_PIXELS``, default 2**28.

    The image reader refuses larger images from their headers; see
    :mod:`mantle_assets.imaging.io` for why there is a limit.

    Raises
    ------
    ValueError
        One line naming the variable when it is set to anything but a
        positive whole number.
    """
    # Imported here: the default is the image reader's, and reading settings must not import numpy.
    from mantle_assets.imaging.io import MAX_FIELD_PIXELS

    value = os.environ.get(MAX_FIELD_PIXELS_ENV, "").strip()
    if not value:
        return MAX_FIELD_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"{MAX_FIELD_PIXELS_ENV} must be a positive whole number, got {value!r}")
    return limit


MAX_IMAGE_BYTES_ENV = "MANTLE_MAX_IMAGE_BYTES"


def max_image_bytes() -> int:
    """The memory one field may take to read and segment: ``$MANTLE_MAX_IMAGE_BYTES``, else half the machine's.

    The machine's memory is the smaller of its physical memory and the memory
    limit of its cgroup (a container's or pod's limit), and half of it is left
    to the rest (Dagster, other steps, the page cache). The image reader
    refuses a file whose pixels alone would exceed it
    (:mod:`mantle_assets.imaging.io`), segmentation a field that Cellpose,
    at the diameter asked for, would need more for
    (:func:`mantle_assets.imaging.segmentation.check_cellpose_memory`).

    Raises
    ------
    ValueError
        One line naming the variable when it is set to anything but a
        positive integer (bytes).
    """
    return positive_integer_setting(MAX_IMAGE_BYTES_ENV, machine_memory() // 2)


def machine_memory() -> int:
    """Bytes of memory this process can have: physical memory, or its cgroup's limit where that is lower."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # v2, v1
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():  # "max" (v2) is no limit; v1 writes a huge number for none, which min() ignores
            memory = min(memory, int(limit))
    return memory


# Never image data: registering them would only expose the machine's own files.
SYSTEM_DIRECTORIES = ("/etc", "/proc", "/sys", "/dev", "/boot", "/bin", "/sbin", "/lib", "/usr", "/var", "/run")


class OutsideDataRootsError(ValueError):
    """A path to register lies outside the configured data roots (or in a system directory)."""


def data_roots() -> list[Path | str]:
    """``$MANTLE_DATA_ROOTS`` as resolved paths and normalised URIs; empty when unset.

    Roots are separated by ``os.pathsep``, except where it begins a URI's ``://``:
    ``/data:s3://lab/plates`` is the folder ``/data`` and the URI ``s3://lab/plates``.
    """
    configured = os.environ.get("MANTLE_DATA_ROOTS", "")
    roots = [root.strip() for root in re.split(rf"{re.escape(os.pathsep)}(?!//)", configured) if root.strip()]
    return [normalised_uri(root) if is_uri(root) else Path(root).expanduser().resolve() for root in roots]


def check_data_path(path: str | os.PathLike, what: str) -> Path | str:
    """Refuse a path outside the data roots, or in a system directory when no roots are configured.

    The path is resolved first, so symbolic links cannot lead out of the roots.
    A URI (``s3://lab/plate1``) must lie under a URI root when roots are
    configured, and may not hold ``..`` segments then; without roots every URI
    is accepted.

    Parameters
    ----------
    path : path or str
        A directory or file to register, or a URI.
    what : str
        How the error names it (e.g. ``"image_directory"``).

    Returns
    -------
    Path or str
        The resolved path, or the normalised URI.

    Raises
    ------
    OutsideDataRootsError
        One line naming the path and the roots.
    """
    roots = data_roots()
    listed = os.pathsep.join(str(root) for root in roots)
    if is_uri(path):
        uri = normalised_uri(path)
        if roots and not _under_uri_root(uri, roots):
            raise OutsideDataRootsError(f"{what} {uri} is outside the data roots (MANTLE_DATA_ROOTS={listed})")
        return uri
    # Not Path.resolve(): Python 3.11's raises RuntimeError on a symbolic link loop, a traceback for the user;
    # realpath leaves a loop as it is, and reading it then fails with one line naming it.
    resolved = Path(os.path.realpath(Path(path).expanduser()))
    if roots:
        if not any(isinstance(root, Path) and resolved.is_relative_to(root) for root in roots):
            raise OutsideDataRootsError(f"{what} {resolved} is outside the data roots (MANTLE_DATA_ROOTS={listed})")
    elif any(resolved.is_relative_to(system) for system in SYSTEM_DIRECTORIES):
        raise OutsideDataRootsError(
            f"{what} {resolved} is in a system directory; set MANTLE_DATA_ROOTS to the folders that hold your data"
        )
    return resolved


def _under_uri_root(uri: str, roots: list[Path | str]) -> bool:
    # Object stores take ".." as part of a key, but a reader may not: refuse it rather than guess.
    if ".." in uri.split("://", 1)[1].split("/"):
        return False
    return any(f"{uri}/".startswith(f"{root}/") for root in roots if isinstance(root, str))
