"""Score a nuclei model: AP on annotated nuclei, size-estimate error, BBBC014 counts, overlays.

Prints figures (no assertions). Example:

    python benchmarks/evaluate_nuclei_model.py --model mantle-nuclei-v1 \
        --val ../shared/data/nuclei_gt/bbbc039_val --plate ../shared/data/bbbc014 --out runs/eval
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from mantle_assets.imaging.fields import group_fields, read_field
from mantle_assets.imaging.precision import PRECISIONS
from mantle_assets.imaging.preview import outline_overlay, png_bytes
from mantle_assets.imaging.segmentation import CellposeSegmenter, SegmentationSettings, select_channels
from mantle_assets.models.registry import resolve_model
from mantle_assets.models.training import describe_hardware, evaluate_segmenter, load_annotated_set

DNA = 2


def plate_wells(plate: Path, doses: tuple[int, ...], per_dose: int) -> list[tuple[str, int]]:
    with (plate / "plate_layout.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = []
    for dose in doses:
        matching = [r for r in rows if int(r["SBS_Doses"]) == dose]
        chosen += [
            (f"{int(r['ImageNumber']):02d}-{r['Row']}-{int(r['Column']):02d}", dose) for r in matching[:per_dose]
        ]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--val", type=Path)
    parser.add_argument("--plate", type=Path)
    parser.add_argument("--wells-per-dose", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    spec = resolve_model(args.model)
    segmenter = CellposeSegmenter(
        spec.path, builtin_name=spec.name if spec.kind == "builtin" else None, precision=args.precision
    )
    report = {"model": args.model, "path": str(spec.path), "hardware": describe_hardware(),
              "precision": segmenter.precision, "size_model": segmenter.size_model is not None}

    if args.val:
        annotated = load_annotated_set(args.val)
        for mode, flag in (("auto_diameter", False), ("annotated_diameter", True)):
            start = time.perf_counter()
            scores = evaluate_segmenter(segmenter, annotated, annotated_diameters=flag)
            scores["seconds_per_image"] = (time.perf_counter() - start) / len(annotated)
            report[f"{args.val.name}_{mode}"] = scores
            print(mode, json.dumps(scores), flush=True)

    if args.plate:
        fields = {f.name: f for f in group_fields(args.plate / "images").fields}
        counts = []
        for well, dose in plate_wells(args.plate, (0, 10), args.wells_per_dose):
            start = time.perf_counter()
            image = select_channels(read_field(fields[well]), DNA, DNA)
            result = segmenter.segment(image, SegmentationSettings())
            seconds = time.perf_counter() - start
            counts.append({"well": well, "dose": dose, "nuclei": int(result.masks.max()),
                           "diameter": round(result.diameter, 2), "seconds": round(seconds, 2)})
            (args.out / f"{well}_overlay.png").write_bytes(png_bytes(outline_overlay(image, result.masks), 640))
            print(json.dumps(counts[-1]), flush=True)
        report["bbbc014"] = counts

    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
