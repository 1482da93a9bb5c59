"""Score nuclei models side by side: AP on annotated nuclei and on held-out acquisition styles, BBBC014 counts.

Prints figures (no assertions). ``--styles`` scores the styles of an annotated set that
``mantle_assets.models.styles`` holds out of training (for ``dsb2018_fluo``: never trained on by
mantle-nuclei-v2; mantle-nuclei-v1 was trained on all of dsb2018_fluo). Example:

    python benchmarks/evaluate_nuclei_model.py --model mantle-nuclei-v1 --model mantle-nuclei-v2 \
        --val ../shared/data/nuclei_gt/bbbc039_val --styles ../shared/data/nuclei_gt/dsb2018_fluo \
        --diameters annotated --out runs/eval
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
from mantle_assets.models.styles import split_annotated_by_style
from mantle_assets.models.training import (
    describe_hardware,
    evaluate_segmenter,
    evaluate_styles,
    load_annotated_set,
    sets_by_style,
)

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


DIAMETER_MODES = {"auto": ("auto_diameter", False), "annotated": ("annotated_diameter", True)}


def score_model(name, segmenter, args, validation, held_out) -> dict:
    """Every requested score of one loaded model, printed as it comes."""
    report = {}
    modes = list(DIAMETER_MODES) if args.diameters == "both" else [args.diameters]
    for mode in modes:
        key, flag = DIAMETER_MODES[mode]
        if validation is not None:
            start = time.perf_counter()
            scores = evaluate_segmenter(segmenter, validation, annotated_diameters=flag)
            scores["seconds_per_image"] = (time.perf_counter() - start) / len(validation)
            report[f"{args.val.name}_{key}"] = scores
            print(args.val.name, key, json.dumps(scores), flush=True)
        if held_out is not None:
            start = time.perf_counter()
            per_style = evaluate_styles(segmenter, held_out, annotated_diameters=flag)
            seconds = (time.perf_counter() - start) / per_style["held_out_styles"]["n_images"]
            for name, scores in per_style.items():
                scores["seconds_per_image"] = seconds
                report[f"{name}_{key}"] = scores
                print(name, key, json.dumps(scores), flush=True)
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
            (args.out / f"{name}_{well}_overlay.png").write_bytes(png_bytes(outline_overlay(image, result.masks), 640))
            print(json.dumps(counts[-1]), flush=True)
        report["bbbc014"] = counts
    return report


def side_by_side(reports: dict[str, dict]) -> str:
    """A markdown table: one row per scored set, AP@0.5/0.75/0.9 and small-object recall of each model."""
    models = list(reports)
    keys = [k for k, v in next(iter(reports.values())).items() if isinstance(v, dict) and "ap50" in v]
    header = "| set | " + " | ".join(f"{m} AP@0.5 / 0.75 / 0.9 (small recall)" for m in models) + " |"
    lines = [header, "|---" * (len(models) + 1) + "|"]
    for key in keys:
        cells = []
        for model in models:
            s = reports[model][key]
            small = "-" if s["small_object_recall"] is None else f"{s['small_object_recall']:.3f}"
            cells.append(f"{s['ap50']:.3f} / {s['ap75']:.3f} / {s['ap90']:.3f} ({small})")
        n = reports[models[0]][key]["n_images"]
        lines.append(f"| {key} ({n} images) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="repeat to compare models side by side")
    parser.add_argument("--val", type=Path, help="annotated set scored whole (e.g. bbbc039_val)")
    parser.add_argument("--styles", type=Path, help="annotated set whose held-out styles are scored (dsb2018_fluo)")
    parser.add_argument("--diameters", choices=("both", *DIAMETER_MODES), default="both")
    parser.add_argument("--plate", type=Path)
    parser.add_argument("--wells-per-dose", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    validation = load_annotated_set(args.val) if args.val else None
    held_out = None
    if args.styles:
        annotated = load_annotated_set(args.styles)
        split = split_annotated_by_style(annotated.images, annotated.masks)
        held_out = sets_by_style(args.styles.name, annotated, split)[1]
        for style in split.held_out:
            print("held out:", split.clusters.describe(style), flush=True)
    reports = {}
    for name in args.model:
        spec = resolve_model(name)
        segmenter = CellposeSegmenter(
            spec.path, builtin_name=spec.name if spec.kind == "builtin" else None, precision=args.precision
        )
        print(f"== {name} ({segmenter.precision})", flush=True)
        reports[name] = {"path": str(spec.path), "hardware": describe_hardware(), "precision": segmenter.precision,
                         "size_model": segmenter.size_model is not None,
                         **score_model(name, segmenter, args, validation, held_out)}
    (args.out / "report.json").write_text(json.dumps(reports, indent=2))
    print(side_by_side(reports))


if __name__ == "__main__":
    main()
