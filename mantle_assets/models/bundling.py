"""Packaging a trained model for shipping inside ``mantle_assets/models/bundled``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from mantle_assets.models.registry import BUNDLED_DIR, BUNDLED_METADATA, ONE_NUCLEAR_CHANNEL
from mantle_assets.models.training import check_model_name

# Kept in float32: the scale parameters are read as numbers, and tiny.
FULL_PRECISION_KEYS = ("diam_mean", "diam_labels")


def export_half_precision(weights: Path, destination: Path) -> None:
    """Save a Cellpose state dict with float16 tensors (half the size).

    Cellpose's loader copies them into its float32 network, so the file still
    loads with ``python -m cellpose --pretrained_model FILE``.
    """
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True)
    torch.save(
        {
            key: value.half() if value.is_floating_point() and key not in FULL_PRECISION_KEYS else value
            for key, value in state.items()
        },
        destination,
    )


def bundle_model(weights: Path, name: str, metadata: dict, *, bundled_dir: Path = BUNDLED_DIR) -> Path:
    """Write ``<bundled_dir>/<name>/``: half-precision weights, the size model and ``model.json``.

    Parameters
    ----------
    weights : Path
        A trained Cellpose model file; ``<weights>_size.npy`` is copied when present.
    name : str
        The bundled model's name (``cellpose_model`` value users select).
    metadata : dict
        Recorded in ``model.json`` (training entity properties, metrics); must hold ``diam_mean``.

    Returns
    -------
    Path
        The model folder.

    Raises
    ------
    ValueError
        If ``name`` is not a simple name (see :func:`~mantle_assets.models.training.check_model_name`).
    """
    folder = bundled_dir / check_model_name(name, "name")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    export_half_precision(weights, target)
    size_model = weights.with_name(weights.name + "_size.npy")
    if size_model.is_file():
        shutil.copyfile(size_model, target.with_name(target.name + "_size.npy"))
    record = {
        "weights": name,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        # Mantle trains on the first channel of single-stain nuclei images (training.py, channels=[0, 0]).
        ONE_NUCLEAR_CHANNEL: True,
        **metadata,
    }
    (folder / BUNDLED_METADATA).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return folder
