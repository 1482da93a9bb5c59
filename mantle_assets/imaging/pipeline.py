"""Segmenting every field of an image directory (framework-free)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mantle_assets.imaging.fields import MASK_SUFFIX, FieldGrouping, read_field
from mantle_assets.imaging.io import MAX_FIELD_PIXELS, read_image_header, write_label_image
from mantle_assets.imaging.preview import outline_overlay, png_bytes
from mantle_assets.imaging.segmentation import (
    CellposeSegmenter,
    SegmentationSettings,
    check_cellpose_memory,
    check_channels,
    select_channels,
)


@dataclass(frozen=True)
class FieldOutcome:
    field: str
    cells: int
    diameter: float
    seconds: float


@dataclass(frozen=True)
class DirectorySegmentation:
    """What segmenting a directory produced."""

    fields: list[FieldOutcome]
    preview_png: bytes
    preview_field: str

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
        Per-field counts and timings, and a PNG preview of the first field:
        mask outlines over the nuclei channel (or the segmented channel).

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
    outcomes, preview = [], b""
    for index, field in enumerate(grouping.fields):
        start = time.perf_counter()
        stack = read_field(field, max_pixels=max_pixels, max_bytes=max_bytes)
        image = select_channels(stack, nuclei_channel, cytoplasm_channel)
        result = segmenter.segment(image, settings, max_bytes=max_bytes, field=field.name)
        write_label_image(output_dir / f"{field.name}{MASK_SUFFIX}", result.masks)
        outcome = FieldOutcome(
            field.name, int(result.masks.max()), result.diameter, time.perf_counter() - start
        )
        outcomes.append(outcome)
        if index == 0:
            shown = image if image.ndim == 2 else image[1]
            preview = png_bytes(outline_overlay(shown, result.masks))
        if on_field is not None:
            on_field(outcome)
    return DirectorySegmentation(outcomes, preview, grouping.fields[0].name)
