"""The BBBC014 plate readout with the 5 px cytoplasm ring and with propagated cells, side by side.

Segments every field's DNA channel with the bundled nuclei model (as
``segmentation_masks`` does, ``diameter=None``), grows each nucleus into its
cell on the NF-kB channel (:func:`mantle_assets.imaging.cells.propagate_cells`,
the ``cell_masks`` asset's default method and parameters), then runs the
platform's measurement and readout code twice: cytoplasm = ring, and
cytoplasm = cell minus nucleus. Nuclei masks already in ``--out`` are reused, so
a second run only repeats the cell step. Prints figures and the seconds per
field of the cell step; asserts nothing. ``--nuclei otsu`` takes the classical
nuclei of ``plate_readout_baseline.py`` instead (about 30 s for the plate, where
Cellpose needs minutes to hours on a busy CPU), so that ring and cells can be
compared on the same nuclei quickly; ``--model`` segments with another Cellpose model (its
name or file) instead of the bundled default. Example:

    nice -n 10 python benchmarks/cells_vs_ring.py --plate ../shared/data/bbbc014 --out runs/cells-vs-ring
    python benchmarks/cells_vs_ring.py --plate ../shared/data/bbbc014 --out runs/cells-vs-ring --nuclei otsu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from plate_readout_baseline import otsu_watershed

from mantle_assets.imaging.assay import plate_readout, read_plate_layout
from mantle_assets.imaging.cells import propagate_cells
from mantle_assets.imaging.fields import group_fields, read_field
from mantle_assets.imaging.io import MAX_FIELD_PIXELS, read_label_image, write_label_image
from mantle_assets.imaging.measurements import measure_directory
from mantle_assets.imaging.pipeline import MASK_SUFFIX
from mantle_assets.imaging.segmentation import CellposeSegmenter, SegmentationSettings, select_channels

NFKB, DNA, CHANNEL_NAMES = 1, 2, ("NFkB", "DNA")


def summary(readout) -> dict:
    fit = readout.fit
    return {
        "z_prime": readout.z_prime,
        "ec50": None if fit is None else fit.ec50,
        "ec50_ci95": None if fit is None else list(fit.ec50_ci95),
        "hill": None if fit is None else fit.hill,
        "r2": None if fit is None else fit.r_squared,
        "dose_means": {float(d["dose"]): round(float(d["mean"]), 3) for _, d in readout.doses.iterrows()},
        "n_cells": int(readout.wells["n_cells"].sum()),
    }


def cellpose_nuclei(model: str | None):
    """A Cellpose nuclei model (the bundled default when None), as segmentation_masks runs it (``diameter=None``)."""
    from mantle_assets.models.cellpose_import import import_cellpose
    from mantle_assets.models.registry import bundled_specs, resolve_model

    import_cellpose()
    path = next(s for s in bundled_specs() if s.offline).path if model is None else resolve_model(model).path
    segmenter = CellposeSegmenter(path)
    return lambda dna: segmenter.segment(dna, SegmentationSettings()).masks


def segment_nuclei(grouping, nuclei_dir: Path, method: str, model: str | None) -> None:
    missing = [f for f in grouping.fields if not (nuclei_dir / f"{f.name}{MASK_SUFFIX}").exists()]
    if not missing:
        return
    segment = cellpose_nuclei(model) if method == "cellpose" else otsu_watershed
    for field in missing:
        start = time.perf_counter()
        masks = segment(select_channels(read_field(field), 0, DNA))
        # Written under a temporary name first so that a killed run leaves no half-written mask to reuse.
        partial = nuclei_dir / f".{field.name}{MASK_SUFFIX}"
        write_label_image(partial, masks)
        partial.rename(nuclei_dir / f"{field.name}{MASK_SUFFIX}")
        print(f"nuclei {field.name}: {int(masks.max())} in {time.perf_counter() - start:.1f} s", flush=True)


def propagate_directory(grouping, nuclei_dir: Path, cells_dir: Path) -> list[float]:
    seconds = []
    for field in grouping.fields:
        start = time.perf_counter()
        nuclei = read_label_image(nuclei_dir / f"{field.name}{MASK_SUFFIX}", max_pixels=MAX_FIELD_PIXELS)
        cells = propagate_cells(nuclei, read_field(field)[NFKB - 1]).cells
        write_label_image(cells_dir / f"{field.name}{MASK_SUFFIX}", cells)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plate", type=Path, required=True, help="BBBC014 folder (images/, plate_layout.csv)")
    parser.add_argument("--out", type=Path, required=True, help="folder for nuclei/ and cells/ masks and results")
    parser.add_argument("--nuclei", choices=("cellpose", "otsu"), default="cellpose", help="how nuclei are found")
    parser.add_argument("--model", help="Cellpose nuclei model (name or file); the bundled default if not given")
    args = parser.parse_args()
    if args.model and args.nuclei != "cellpose":
        parser.error("--model names a Cellpose model; it does not apply to --nuclei otsu")

    grouping = group_fields(args.plate / "images")
    suffix = f"-{args.nuclei}" if args.nuclei != "cellpose" else f"-{Path(args.model).name}" if args.model else ""
    nuclei_dir, cells_dir = args.out / f"nuclei{suffix}", args.out / f"cells{suffix}"
    nuclei_dir.mkdir(parents=True, exist_ok=True)
    cells_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    segment_nuclei(grouping, nuclei_dir, args.nuclei, args.model)
    print(f"nuclei: {len(grouping.fields)} fields ready after {time.perf_counter() - start:.0f} s", flush=True)
    cell_seconds = propagate_directory(grouping, nuclei_dir, cells_dir)
    layout = read_plate_layout(args.plate / "plate_layout.csv")
    results = {}
    for name, cell_masks in (("ring", None), ("cell", cells_dir)):
        objects = measure_directory(grouping, nuclei_dir, CHANNEL_NAMES, cell_mask_directory=cell_masks)
        readout = plate_readout(objects, value_column="NFkB_ratio", layout=layout, expected_wells=grouping.wells)
        results[name] = summary(readout)
        if cell_masks is not None:
            bigger = (objects["cell_area"] > objects["area"]).mean()
            results[name]["cells_larger_than_nucleus"] = round(float(bigger), 4)
    results["cell_step_seconds_per_field"] = {
        "median": round(float(np.median(cell_seconds)), 2),
        "max": round(float(np.max(cell_seconds)), 2),
        "total": round(float(np.sum(cell_seconds)), 1),
    }
    text = json.dumps(results, indent=2, default=float)
    (args.out / f"results{suffix}.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
