"""Where Mantle keeps its state, read from the environment at call time."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MANTLE_HOME = ".mantle"


def mantle_home() -> Path:
    """``$MANTLE_HOME`` (default ``./.mantle``) as an absolute path."""
    return Path(os.environ.get("MANTLE_HOME", DEFAULT_MANTLE_HOME)).expanduser().resolve()


def dagster_home() -> Path:
    """``$DAGSTER_HOME``, or ``$MANTLE_HOME/dagster`` so the CLI and UI share one instance."""
    configured = os.environ.get("DAGSTER_HOME")
    return Path(configured).expanduser().resolve() if configured else mantle_home() / "dagster"


def mask_root() -> Path:
    """Where segmentation outputs are written: ``$MANTLE_HOME/masks``."""
    return mantle_home() / "masks"


# Never image data: registering them would only expose the machine's own files.
SYSTEM_DIRECTORIES = ("/etc", "/proc", "/sys", "/dev", "/boot", "/bin", "/sbin", "/lib", "/usr", "/var", "/run")


class OutsideDataRootsError(ValueError):
    """A path to register lies outside the configured data roots (or in a system directory)."""


def data_roots() -> list[Path]:
    """``$MANTLE_DATA_ROOTS`` (``os.pathsep``-separated) as resolved paths; empty when unset."""
    configured = os.environ.get("MANTLE_DATA_ROOTS", "")
    return [Path(root).expanduser().resolve() for root in configured.split(os.pathsep) if root.strip()]


def check_data_path(path: str | os.PathLike, what: str) -> Path:
    """Refuse a path outside the data roots, or in a system directory when no roots are configured.

    The path is resolved first, so symbolic links cannot lead out of the roots.

    Parameters
    ----------
    path : path
        A directory or file to register.
    what : str
        How the error names it (e.g. ``"image_directory"``).

    Returns
    -------
    Path
        The resolved path.

    Raises
    ------
    OutsideDataRootsError
        One line naming the path and the roots.
    """
    resolved = Path(path).expanduser().resolve()
    roots = data_roots()
    if roots:
        if not any(resolved.is_relative_to(root) for root in roots):
            listed = os.pathsep.join(str(root) for root in roots)
            raise OutsideDataRootsError(f"{what} {resolved} is outside the data roots (MANTLE_DATA_ROOTS={listed})")
    elif any(resolved.is_relative_to(system) for system in SYSTEM_DIRECTORIES):
        raise OutsideDataRootsError(
            f"{what} {resolved} is a system directory; set MANTLE_DATA_ROOTS to the folders that hold your data"
        )
    return resolved
