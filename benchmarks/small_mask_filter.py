"""How many masks the small-mask filter fix changes: Cellpose 3.1.1.3's own filter against Mantle's.

Segments every image of an annotated set twice with the same network output settings: once with
Cellpose's ``min_size`` (its ``utils.fill_holes_and_remove_small_masks``, which counts pixels by label
rank), once through :meth:`CellposeSegmenter.segment` (``min_size=-1``, then
:func:`~mantle_assets.imaging.segmentation.fill_holes_and_remove_small_masks`), at each image's annotated
median diameter. Prints masks found only by one or the other (a mask is the same if it has the same
pixels) and AP@0.5 of both. Example:

    nice -n 10 python benchmarks/small_mask_filter.py --model mantle-nuclei-v1 \
        --val ../shared/data/nuclei_gt/bbbc039_val
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from cellpose.metrics import average_precision
from cellpose.utils import diameters

from mantle_assets.imaging.segmentation import CellposeSegmenter, SegmentationSettings
from mantle_assets.models.registry import resolve_model
from mantle_assets.models.training import load_annotated_set


def mask_pixels(masks: np.ndarray) -> set[bytes]:
    """Each mask as the bytes of its pixels' flat indices, whatever its label."""
    flat = masks.ravel()
    order = np.argsort(flat, kind="stable")
    labels, starts = np.unique(flat[order], return_index=True)
    return {part.tobytes() for label, part in zip(labels, np.split(order, starts[1:]), strict=True) if label}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--val", type=Path, required=True)
    args = parser.parse_args()

    segmenter = CellposeSegmenter(resolve_model(args.model).path, gpu=False)
    annotated = load_annotated_set(args.val)
    start = time.perf_counter()
    totals = {"cellpose": 0, "mantle": 0, "only_cellpose": 0, "only_mantle": 0, "images_changed": 0}
    predicted = {"cellpose": [], "mantle": []}
    for name, image, truth in zip(annotated.names, annotated.images, annotated.masks, strict=True):
        settings = SegmentationSettings(diameter=float(diameters(truth)[0]))
        cellpose_masks = segmenter.model.eval(
            image, channels=[0, 0], diameter=settings.diameter, flow_threshold=settings.flow_threshold,
            cellprob_threshold=settings.cellprob_threshold, min_size=settings.min_size,
        )[0]
        mantle_masks = segmenter.segment(image, settings).masks
        old, new = mask_pixels(cellpose_masks), mask_pixels(mantle_masks)
        totals["cellpose"] += len(old)
        totals["mantle"] += len(new)
        totals["only_cellpose"] += len(old - new)
        totals["only_mantle"] += len(new - old)
        totals["images_changed"] += old != new
        if old != new:
            print(f"{name}: {len(old - new)} mask(s) only with Cellpose's filter, {len(new - old)} only with Mantle's")
        predicted["cellpose"].append(cellpose_masks)
        predicted["mantle"].append(mantle_masks)
    for which, masks in predicted.items():
        ap = average_precision(annotated.masks, masks, threshold=[0.5])[0][:, 0].mean()
        print(f"{which}: {totals[which]} masks, AP@0.5 {ap:.4f}")
    print(f"{len(annotated.names)} images, {totals['images_changed']} changed: {totals['only_cellpose']} masks only "
          f"with Cellpose's filter, {totals['only_mantle']} only with Mantle's; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
