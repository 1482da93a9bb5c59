"""The BBBC014 plate readout from classical nuclei (Otsu threshold + watershed), beside Cellpose's.

Segments every field's DNA channel with a global Otsu threshold, splits touching
nuclei by a distance-transform watershed (scikit-image), then runs the
platform's own measurement and readout code (5 px cytoplasm ring, NF-kB
nucleus/cytoplasm ratio, Z', 4PL). With ``--cellpose-readout`` it prints the
``readout.json`` of an ``assay_readout`` materialisation next to it. Prints
figures; asserts nothing. Example:

    python benchmarks/plate_readout_baseline.py --plate ../shared/data/bbbc014 \
        --cellpose-readout $MANTLE_HOME/readouts/E000001/<run>/readout.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.segmentation import watershed

from mantle_assets.imaging.assay import plate_readout, read_plate_layout
from mantle_assets.imaging.fields import group_fields, read_field
from mantle_assets.imaging.io import write_label_image
from mantle_assets.imaging.measurements import measure_directory
from mantle_assets.imaging.pipeline import MASK_SUFFIX

DNA, CHANNEL_NAMES = 2, ("NFkB", "DNA")


def otsu_watershed(dna: np.ndarray, *, min_distance: int = 5, min_size: int = 15) -> np.ndarray:
    """Classical nuclei: smoothed Otsu foreground split by a watershed on the distance transform."""
    smooth = gaussian(dna.astype(np.float32), sigma=1)
    blobs, _ = ndi.label(smooth > threshold_otsu(smooth))
    sizes = np.bincount(blobs.ravel())
    blobs[sizes[blobs] < min_size] = 0
    foreground = blobs > 0
    distance = ndi.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=blobs, exclude_border=False)
    markers = np.zeros(dna.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=foreground).astype(np.uint16)


def summary(readout) -> dict:
    fit = readout.fit
    return {
        "z_prime": readout.z_prime,
        "ec50": None if fit is None else fit.ec50,
        "hill": None if fit is None else fit.hill,
        "r2": None if fit is None else fit.r_squared,
        "dose_means": {float(d["dose"]): round(float(d["mean"]), 3) for _, d in readout.doses.iterrows()},
        "n_cells": int(readout.wells["n_cells"].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plate", type=Path, required=True, help="BBBC014 folder (images/, plate_layout.csv)")
    parser.add_argument("--cellpose-readout", type=Path, help="readout.json of an assay_readout materialisation")
    args = parser.parse_args()

    grouping = group_fields(args.plate / "images")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as masks:
        for field in grouping.fields:
            write_label_image(Path(masks) / f"{field.name}{MASK_SUFFIX}", otsu_watershed(read_field(field)[DNA - 1]))
        objects = measure_directory(grouping, masks, CHANNEL_NAMES)
    seconds = time.perf_counter() - start
    readout = plate_readout(
        objects, value_column="NFkB_ratio", layout=read_plate_layout(args.plate / "plate_layout.csv"),
        expected_wells=grouping.wells,
    )
    baseline = summary(readout)
    print(f"Otsu + watershed: {len(grouping.fields)} fields in {seconds:.0f} s")
    print(json.dumps({"otsu_watershed": baseline}, indent=2, default=float))
    if args.cellpose_readout:
        cellpose = json.loads(args.cellpose_readout.read_text())
        print(json.dumps({"cellpose": cellpose}, indent=2, default=float)[:4000])


if __name__ == "__main__":
    main()
