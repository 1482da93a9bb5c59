"""The segmentation_masks materialisation against the raw Cellpose CLI on the same BBBC014 wells.

Both segment the DNA channel with the same model file and diameter. Our side is
`mantle segment` (a Dagster run recording entities and lineage) on a registered
directory of per-channel files; the CLI gets one two-channel TIFF per field,
prepared before timing, and `--chan 2 --chan2 0`. Prints wall times, seconds per
field, peak RSS of each process, orchestration overhead (our wall time outside
Cellpose's work: loading the model, which imports Cellpose and torch, and each
field's read-segment-write, both taken from the run's log) and mask agreement
(IoU>=0.5-matched F1 per field). Example:

    python benchmarks/segmentation_vs_cellpose_cli.py --plate ../shared/data/bbbc014 --wells 4
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from mantle_assets.models.registry import resolve_model

DNA = 2
MODEL_LOADED = re.compile(r"loaded model \S+ on \S+ in (\S+) in ([0-9.]+) s")
FIELD_DONE = re.compile(r": \d+ objects in ([0-9.]+) s")


def timed(command: list[str], env: dict, log: Path) -> tuple[float, float, str]:
    """Run a command; return wall seconds, the process's peak RSS in MiB and its stdout."""
    with open(log, "w+") as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    if process.returncode:
        sys.exit(f"{' '.join(command[:4])} failed:\n{text[-2000:]}")
    return wall, usage.ru_maxrss / 1024, text


def f1(truth: np.ndarray, other: np.ndarray) -> float:
    from cellpose import metrics

    _, tp, fp, fn = metrics.average_precision([truth.astype(np.int32)], [other.astype(np.int32)], threshold=[0.5])
    tp, fp, fn = tp[0, 0], fp[0, 0], fn[0, 0]
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plate", type=Path, required=True)
    parser.add_argument("--wells", type=int, default=4)
    parser.add_argument("--model", default="mantle-nuclei-v1")
    parser.add_argument("--diameter", type=float, default=15.0)
    args = parser.parse_args()
    args.plate = args.plate.resolve()  # the scratch directory links to its files
    weights = resolve_model(args.model).path
    wells = sorted(p.name.removeprefix("Channel2-").removesuffix(".tif")
                   for p in (args.plate / "images").glob("Channel2-*.tif"))[: args.wells]

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        ours, cli = scratch / "plate", scratch / "cli"
        ours.mkdir()
        cli.mkdir()
        for well in wells:
            channels = [tifffile.imread(args.plate / "images" / f"Channel{c}-{well}.tif") for c in (1, 2)]
            for c in (1, 2):
                (ours / f"Channel{c}-{well}.tif").symlink_to(args.plate / "images" / f"Channel{c}-{well}.tif")
            tifffile.imwrite(cli / f"{well}.tif", np.stack(channels))
        env = dict(os.environ, MANTLE_HOME=str(scratch / "home"))
        env.pop("DAGSTER_HOME", None)
        entity = subprocess.run([sys.executable, "-m", "mantle_assets.cli", "register", str(ours)],
                                env=env, check=True, capture_output=True, text=True).stdout.split(":")[0]
        # A platform's MANTLE_HOME outlives its runs, and so does the numba cache in it: fill it
        # once, untimed, as the first run on a machine does (its cost is printed apart).
        warm_up_wall, _, _ = timed(
            [sys.executable, "-c", "from mantle_assets.models.cellpose_import import import_cellpose as i; i()"],
            env, scratch / "warm-up.log")

        our_wall, our_rss, out = timed(
            [sys.executable, "-m", "mantle_assets.cli", "segment", entity, "--cellpose-model", args.model,
             "--nuclei-channel", str(DNA), "--cytoplasm-channel", str(DNA), "--diameter", str(args.diameter)],
            env, scratch / "ours.log")
        cli_wall, cli_rss, _ = timed(
            [sys.executable, "-m", "cellpose", "--dir", str(cli), "--pretrained_model", str(weights),
             "--chan", str(DNA), "--chan2", "0", "--diameter", str(args.diameter), "--save_tif", "--no_npy"],
            env, scratch / "cli.log")

        mask_dir = Path(out.split("-> ")[-1].split(" (run")[0])
        precision, load_seconds = MODEL_LOADED.search(out).groups()
        field_seconds = [float(s) for s in FIELD_DONE.findall(out)]
        cellpose_seconds = float(load_seconds) + sum(field_seconds)
        scores = [f1(tifffile.imread(cli / f"{well}_cp_masks.tif"), tifffile.imread(mask_dir / f"{well}_cp_masks.tif"))
                  for well in wells]

    print(f"{len(wells)} fields of 640x640, model {args.model}, diameter {args.diameter:g}, {os.cpu_count()} cores")
    print(f"ours computes in {precision}; the CLI in float32")
    print(f"filling the numba cache (once per machine, untimed above): {warm_up_wall:.1f} s")
    print(f"segmentation_masks (mantle segment): {our_wall:7.1f} s wall, {our_wall / len(wells):5.1f} s/field")
    print(f"Cellpose CLI:                        {cli_wall:7.1f} s wall, {cli_wall / len(wells):5.1f} s/field")
    print(f"wall-time ratio ours/CLI: {our_wall / cli_wall:.2f}")
    print(f"peak RSS (MiB): ours {our_rss:.0f}, CLI {cli_rss:.0f}")
    print(f"ours: model load {float(load_seconds):.1f} s + fields {sum(field_seconds):.1f} s = Cellpose's work "
          f"{cellpose_seconds:.1f} s; orchestration overhead {our_wall - cellpose_seconds:.1f} s "
          f"({100 * (our_wall - cellpose_seconds) / our_wall:.1f} % of wall)")
    print(f"mask agreement F1@IoU0.5 per field: min {min(scores):.4f}, mean {np.mean(scores):.4f}")


if __name__ == "__main__":
    main()
