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
