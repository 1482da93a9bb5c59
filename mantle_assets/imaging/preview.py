"""Preview images: mask outlines drawn over an intensity image, and contact sheets of many fields."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

OUTLINE_COLOUR = (255, 64, 64)
# Cyan beside red: the pair stays apart for red-green colour-blind eyes too.
CELL_OUTLINE_COLOUR = (64, 224, 255)
SHEET_BACKGROUND = (40, 40, 40)
LABEL_COLOUR = (255, 255, 255)
LABEL_HEIGHT = 14  # px: the band above each tile that holds its label
TILE_GAP = 2  # px between tiles


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


def outline_overlay(image: np.ndarray, masks: np.ndarray, cells: np.ndarray | None = None) -> np.ndarray:
    """An RGB uint8 picture of ``image`` in grey with the outlines of ``masks`` (and ``cells``) in colour.

    Parameters
    ----------
    image : ndarray, (Y, X)
        Intensities.
    masks : ndarray of int, (Y, X)
        Label image, e.g. of nuclei: outlined in ``OUTLINE_COLOUR``.
    cells : ndarray of int, (Y, X), optional
        A second label image, e.g. of the cells around those nuclei: outlined
        in ``CELL_OUTLINE_COLOUR``, under the outlines of ``masks`` where both
        run along the same pixels.

    Returns
    -------
    ndarray, (Y, X, 3) uint8

    Raises
    ------
    ValueError
        If ``cells`` is not the shape of ``masks``.
    """
    from skimage.segmentation import find_boundaries

    grey = to_display(image)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if cells is not None:
        if cells.shape != masks.shape:
            raise ValueError(f"outline overlay: cells of shape {cells.shape} for masks of shape {masks.shape}")
        rgb[find_boundaries(cells, mode="inner")] = CELL_OUTLINE_COLOUR
    rgb[find_boundaries(masks, mode="inner")] = OUTLINE_COLOUR
    return rgb


def spread_indices(count: int, limit: int) -> list[int]:
    """Up to ``limit`` indices of ``range(count)``, evenly spaced from the first to the last.

    Examples
    --------
    >>> spread_indices(3, 16)
    [0, 1, 2]
    >>> spread_indices(96, 4)
    [0, 32, 63, 95]
    """
    if count <= limit:
        return list(range(count))
    return [int(i) for i in np.linspace(0, count - 1, limit).round()]


def outline_thumbnail(
    image: np.ndarray, masks: np.ndarray, size: int, cells: np.ndarray | None = None
) -> np.ndarray:
    """:func:`outline_overlay` of a field shrunk so that its longer side is at most ``size``.

    The boundaries are found at the thumbnail's scale, so they stay one pixel
    wide and visible however much the field is shrunk; outlines drawn first
    and then shrunk would mostly vanish.

    Parameters
    ----------
    image : ndarray, (Y, X)
        Intensities.
    masks : ndarray of int, (Y, X)
        Label image, e.g. of nuclei.
    size : int
        The most pixels of the thumbnail's longer side.
    cells : ndarray of int, (Y, X), optional
        A second label image drawn in a second colour (see :func:`outline_overlay`).

    Returns
    -------
    ndarray, (y, x, 3) uint8
        ``y = ceil(Y / f)``, ``x = ceil(X / f)`` with ``f = ceil(max(Y, X) / size)``.
    """
    from skimage.transform import resize

    factor = max(1, math.ceil(max(image.shape) / size))
    small_masks = masks[::factor, ::factor]  # nearest: labels must not be averaged
    small_cells = None if cells is None else cells[::factor, ::factor]
    small_image = resize(image.astype(np.float32), small_masks.shape, anti_aliasing=factor > 1, preserve_range=True)
    return outline_overlay(small_image, small_masks, small_cells)


def contact_sheet(tiles: Sequence[np.ndarray], labels: Sequence[str], columns: int = 4) -> np.ndarray:
    """Tiles in a grid, row by row, each under a band that holds its label.

    Parameters
    ----------
    tiles : sequence of ndarray, (y, x, 3) uint8
        Pictures, e.g. from :func:`outline_thumbnail`; every cell of the grid
        is as large as the largest tile.
    labels : sequence of str
        One per tile, shortened with an ellipsis where it is wider than the tile.
    columns : int
        Tiles per row (fewer when there are fewer tiles).

    Returns
    -------
    ndarray, (H, W, 3) uint8
        With ``r = ceil(n / c)`` rows of ``c = min(columns, n)`` cells:
        ``H = r * (LABEL_HEIGHT + y_max + TILE_GAP) - TILE_GAP`` and
        ``W = c * (x_max + TILE_GAP) - TILE_GAP``.

    Raises
    ------
    ValueError
        If there are no tiles, or not one label per tile.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not tiles or len(tiles) != len(labels):
        raise ValueError(f"contact sheet: {len(tiles)} tiles and {len(labels)} labels; need one label per tile")
    tile_height = max(tile.shape[0] for tile in tiles)
    tile_width = max(tile.shape[1] for tile in tiles)
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    cell_height, cell_width = LABEL_HEIGHT + tile_height + TILE_GAP, tile_width + TILE_GAP
    sheet = np.empty((rows * cell_height - TILE_GAP, columns * cell_width - TILE_GAP, 3), np.uint8)
    sheet[...] = SHEET_BACKGROUND
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * cell_height + LABEL_HEIGHT, (index % columns) * cell_width
        sheet[top : top + tile.shape[0], left : left + tile.shape[1]] = tile

    picture = Image.fromarray(sheet)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=LABEL_HEIGHT - 3)
    for index, label in enumerate(labels):
        top, left = (index // columns) * cell_height, (index % columns) * cell_width
        draw.text((left + 2, top + 1), fitted(label, tile_width - 4, draw, font), fill=LABEL_COLOUR, font=font)
    return np.asarray(picture)


def fitted(label: str, width: int, draw, font) -> str:
    """``label``, cut short with an ellipsis until it is at most ``width`` pixels wide in ``font``."""
    if draw.textlength(label, font=font) <= width:
        return label
    while label and draw.textlength(label + "…", font=font) > width:
        label = label[:-1]
    return label + "…"


def png_bytes(rgb: np.ndarray, max_size: int = 512, colours: int | None = None) -> bytes:
    """Encode an RGB array as PNG, shrunk so its longer side is at most ``max_size``.

    ``colours``: a palette of at most this many colours (about half the
    bytes for grey fields with coloured outlines); None keeps every colour.
    """
    from PIL import Image

    picture = Image.fromarray(rgb)
    picture.thumbnail((max_size, max_size), Image.Resampling.NEAREST)
    if colours is not None:
        picture = picture.quantize(colours)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
