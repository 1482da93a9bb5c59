"""Segmenting every field of an image directory (framework-free)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mantle_assets.imaging.fields import MASK_SUFFIX, FieldGrouping, read_field
from mantle_assets.imaging.io import MAX_FIELD_PIXELS, read_image_header, write_label_image
from mantle_assets.imaging.preview import contact_sheet, outline_thumbnail, png_bytes, spread_indices
from mantle_assets.imaging.segmentation import (
    CellposeSegmenter,
    SegmentationSettings,
    check_cellpose_memory,
    check_channels,
    select_channels,
)

SHEET_FIELDS = 16  # tiles of the contact sheet: a 4 x 4 grid
SHEET_TILE_PX = 160  # its tiles' longer side: 16 tiles stay a few hundred KB of PNG
SHEET_COLOURS = 256  # a palette PNG: about half the bytes of RGB, greys and outlines kept


@dataclass(frozen=True)
class FieldOutcome:
    field: str
    well: str | None
    cells: int
    median_area: float | None
    """Pixels of the field's median object; None without objects."""
    diameter: float
    seconds: float


@dataclass(frozen=True)
class DirectorySegmentation:
    """What segmenting a directory produced."""

    fields: list[FieldOutcome]
    contact_sheet_png: bytes
    sheet_fields: list[str]
    """The fields on the contact sheet, in its order."""

    @property
    def total_cells(self) -> int:
        return sum(f.cells for f in self.fields)

    def cells_per_field(self) -> dict[str, int]:
        return {f.field: f.cells for f in self.fields}

    def median_diameter(self) -> float:
        return float(np.median([f.diameter for f in self.fields]))


def segment_directory(
    grouping: FieldGrouping,
    segmenter: CellposeSegmenter,
    *,
    nuclei_channel: int,
    cytoplasm_channel: int,
    settings: SegmentationSettings,
    output_dir: Path,
    max_pixels: int = MAX_FIELD_PIXELS,
    max_bytes: int | None = None,
    on_field: Callable[[FieldOutcome], None] | None = None,
) -> DirectorySegmentation:
    """Segment each field and write ``<field>_cp_masks.tif`` into ``output_dir``.

    Parameters
    ----------
    grouping : FieldGrouping
        The directory's fields.
    segmenter : CellposeSegmenter
        A loaded model.
    nuclei_channel, cytoplasm_channel : int
        Mantle channel parameters (0, or the c-th channel of a field; see ``select_channels``).
    settings : SegmentationSettings
        Diameter and Cellpose thresholds.
    output_dir : Path
        An existing, empty directory.
    max_pixels : int
        The most pixels one channel plane of a field may have (see :func:`read_field`).
    max_bytes : int, optional
        The memory one field may take, to read (:func:`read_field`) and to
        segment at the diameter asked for
        (:func:`~mantle_assets.imaging.segmentation.check_cellpose_memory`);
        None: no budget.
    on_field : callable, optional
        Called after each field (progress reporting).

    Returns
    -------
    DirectorySegmentation
        Per-field counts, median object areas and timings, and a PNG contact
        sheet: mask outlines over the nuclei channel (or the segmented channel)
        of up to ``SHEET_FIELDS`` fields spread across the plate
        (:func:`sheet_indices`), each labelled with its well, field and count.

    Raises
    ------
    ParameterError
        Before any field is segmented, if a field needs more than
        ``max_bytes`` at the diameter given (or, with ``diameter=None``, at
        the model's own, where the estimate starts); an estimated diameter
        is checked when it is known.
    ImageDirectoryError
        If a file cannot be read (:func:`read_field`).
    """
    check_channels(nuclei_channel, cytoplasm_channel, grouping.n_channels)
    if max_bytes is not None:
        # Every field is checked from its header first: a field Cellpose cannot hold fails the run before any work.
        for field in grouping.fields:
            shape = read_image_header(field.files[0], max_pixels=max_pixels, max_bytes=max_bytes).shape
            diameter, source = (settings.diameter, "given") if settings.diameter else (segmenter.diam_mean, "model")
            check_cellpose_memory(field.name, shape, diameter, segmenter.diam_mean, max_bytes, source=source)
    shown = sheet_indices(grouping)
    outcomes, tiles = [], {}
    for index, field in enumerate(grouping.fields):
        start = time.perf_counter()
        stack = read_field(field, max_pixels=max_pixels, max_bytes=max_bytes)
        image = select_channels(stack, nuclei_channel, cytoplasm_channel)
        result = segmenter.segment(image, settings, max_bytes=max_bytes, field=field.name)
        write_label_image(output_dir / f"{field.name}{MASK_SUFFIX}", result.masks)
        areas = np.bincount(result.masks.ravel())[1:]
        areas = areas[areas > 0]
        outcome = FieldOutcome(
            field.name,
            field.well,
            int(result.masks.max()),
            float(np.median(areas)) if areas.size else None,
            result.diameter,
            time.perf_counter() - start,
        )
        outcomes.append(outcome)
        if index in shown:
            # Only the thumbnail is kept: a plate's full-size fields would not fit in memory.
            tiles[index] = outline_thumbnail(image if image.ndim == 2 else image[1], result.masks, SHEET_TILE_PX)
        if on_field is not None:
            on_field(outcome)
    labels = [tile_label(outcomes[index]) for index in shown]
    sheet = contact_sheet([tiles[index] for index in shown], labels)
    return DirectorySegmentation(
        outcomes, png_bytes(sheet, max(sheet.shape[:2]), SHEET_COLOURS), [outcomes[i].field for i in shown]
    )


def sheet_indices(grouping: FieldGrouping, limit: int = SHEET_FIELDS) -> list[int]:
    """Indices of up to ``limit`` fields evenly spaced over the plate, in plate order.

    Fields are put in their wells' plate order (``A01, A02, ..., B01``; fields
    without a well last, each group in name order) and every
    ``(n - 1) / (limit - 1)``-th is taken, first and last included: a 96-well
    plate shows every sixth well or so, with one field per well or with
    nine (then at different sites).
    """
    rank = {well: position for position, well in enumerate(grouping.wells)}
    order = sorted(range(len(grouping.fields)), key=lambda i: rank.get(grouping.fields[i].well, len(rank)))
    return [order[i] for i in spread_indices(len(order), limit)]


def tile_label(outcome: FieldOutcome) -> str:
    """E.g. ``A01 · 01-A-01: 45``: well (where the names give one), field and object count."""
    where = f"{outcome.well} · {outcome.field}" if outcome.well else outcome.field
    return f"{where}: {outcome.cells}"
