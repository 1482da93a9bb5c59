"""Preview images: mask outlines drawn over an intensity image."""

from __future__ import annotations

import io

import numpy as np

OUTLINE_COLOUR = (255, 64, 64)


def to_display(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Scale an intensity image to uint8 between two percentiles.

    Examples
    --------
    >>> to_display(np.array([[0.0, 1.0], [2.0, 3.0]]), 0, 100).tolist()
    [[0, 85], [170, 255]]
    """
    lo, hi = np.percentile(image, [low, high])
    scaled = (image.astype(np.float32) - lo) / max(float(hi - lo), 1e-12)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def outline_overlay(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """An RGB uint8 picture of ``image`` in grey with the outlines of ``masks`` in colour.

    Parameters
    ----------
    image : ndarray, (Y, X)
        Intensities.
    masks : ndarray of int, (Y, X)
        Label image.

    Returns
    -------
    ndarray, (Y, X, 3) uint8
    """
    from skimage.segmentation import find_boundaries

    grey = to_display(image)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[find_boundaries(masks, mode="inner")] = OUTLINE_COLOUR
    return rgb


def png_bytes(rgb: np.ndarray, max_size: int = 512) -> bytes:
    """Encode an RGB array as PNG, shrunk so its longer side is at most ``max_size``."""
    from PIL import Image

    picture = Image.fromarray(rgb)
    picture.thumbnail((max_size, max_size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
