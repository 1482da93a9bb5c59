"""Reading and writing single image files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png", ".jpg", ".jpeg", ".bmp")


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a path has one of the supported image suffixes (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one TIFF, PNG, JPEG or BMP file into an array.

    Parameters
    ----------
    path : path
        The image file.

    Returns
    -------
    ndarray
        The pixels as stored: ``(Y, X)``, ``(Y, X, C)`` or ``(C, Y, X)``.

    Raises
    ------
    ImageReadError
        If the file is missing, empty, truncated or not an image.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image)
    except Exception as error:  # noqa: BLE001 - any decoder failure means an unreadable file
        raise ImageReadError(f"cannot read image {path}: {error}") from None


def write_label_image(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write a label image as TIFF, uint16 unless the labels need uint32.

    Parameters
    ----------
    path : path
        Destination file.
    labels : ndarray of int
        Label image (0 = background).
    """
    import tifffile

    dtype = np.uint16 if labels.max(initial=0) < 2**16 else np.uint32
    tifffile.imwrite(path, labels.astype(dtype), compression="zlib")
