"""The BBBC014 demo plate: finding or downloading it, and choosing a quick subset of wells."""

from __future__ import annotations

import csv
import os
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from mantle_assets.atomic import atomic_directory

EXPERIMENT = "BBBC014 NF-kB translocation"
ARCHIVE_URL = "https://data.broadinstitute.org/bbbc/BBBC014/BBBC014_v1_images.zip"
PLATE_LAYOUT = "plate_layout.csv"
DOWNLOAD_TIMEOUT_S = 60
QUICK_WELLS_PER_CONTROL = 2
# Channel1 is NF-kB (GFP), Channel2 DNA (Hoechst), checked by eye: nuclei-only segmentation of channel 2,
# and the NF-kB nucleus/cytoplasm ratio is the readout.
CHANNEL_NAMES = ["NFkB", "DNA"]
DNA_CHANNEL = 2


class DemoDataError(RuntimeError):
    """The demo plate is neither on disk nor downloadable."""


def default_data_candidates() -> list[Path]:
    project_root = Path(__file__).resolve().parents[1]
    configured = os.environ.get("MANTLE_DEMO_DATA")
    candidates = [Path(configured)] if configured else []
    return candidates + [
        project_root.parent / "shared" / "data" / "bbbc014",
        Path.cwd().parent / "shared" / "data" / "bbbc014",
    ]


def locate_plate(data: Path | None, cache: Path) -> Path:
    """The plate folder: given, found beside the project, or downloaded into ``cache``."""
    if data is not None:
        if not (data / "images").is_dir():
            raise DemoDataError(f"{data} has no images/ folder")
        return data
    for candidate in default_data_candidates():
        if (candidate / "images").is_dir():
            return candidate
    return download_plate(cache / "bbbc014")


def download_plate(target: Path) -> Path:
    """Download and unpack the public BBBC014 archive (once)."""
    images = target / "images"
    if images.is_dir() and any(images.iterdir()):
        return target
    target.mkdir(parents=True, exist_ok=True)
    archive = target / "BBBC014_v1_images.zip.part"
    try:
        with urllib.request.urlopen(ARCHIVE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response, archive.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="BBBC014") as progress:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    progress.update(len(chunk))
        with atomic_directory(images) as partial, zipfile.ZipFile(archive) as zipped:
            for member in zipped.infolist():
                name = Path(member.filename).name
                if not member.is_dir() and name.lower().endswith((".tif", ".bmp")):
                    (partial / name).write_bytes(zipped.read(member))
    except (OSError, zipfile.BadZipFile) as error:
        raise DemoDataError(f"BBBC014 not found locally and its download failed ({ARCHIVE_URL}: {error})") from None
    finally:
        archive.unlink(missing_ok=True)
    return target


def quick_wells(layout_csv: Path) -> list[str]:
    """Image numbers of the first negative- and positive-control wells (two of each)."""
    with layout_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = []
    for control in ("-1", "1"):
        matching = [r for r in rows if r["SBS_Controls"].strip() == control]
        chosen += [
            f"{int(r['ImageNumber']):02d}-{r['Row']}-{int(r['Column']):02d}"
            for r in matching[:QUICK_WELLS_PER_CONTROL]
        ]
    return chosen


def prepare_plate(data: Path | None, *, all_wells: bool, cache: Path) -> Path:
    """The directory to register: the whole plate, or a folder of links to a few wells.

    The quick subset links to (never copies) the control wells' files, so it
    shows both ends of the assay in a couple of minutes on a CPU.
    """
    plate = locate_plate(data, cache)
    images = plate / "images"
    if all_wells:
        return images
    layout = plate / PLATE_LAYOUT
    files = sorted(p for p in images.iterdir() if p.is_file())
    if layout.is_file():
        wells = quick_wells(layout)
        files = [p for p in files if p.stem.split("-", 1)[-1] in wells]
    else:
        first = sorted({p.stem.split("-", 1)[-1] for p in files})[: 2 * QUICK_WELLS_PER_CONTROL]
        files = [p for p in files if p.stem.split("-", 1)[-1] in first]
    subset = cache / "bbbc014-quick"
    subset.mkdir(parents=True, exist_ok=True)
    for path in files:
        link = subset / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
    return subset


def segmentation_parameters(cellpose_model: str | None) -> dict:
    return {
        "cellpose_model": cellpose_model,
        "nuclei_channel": DNA_CHANNEL,
        "cytoplasm_channel": DNA_CHANNEL,
        "diameter": "None",
    }


def registration_metadata(plate: Path) -> dict:
    """Channel names and, where the plate folder has one, its plate layout (the public archive has none)."""
    layout = plate / PLATE_LAYOUT
    return {"channel_names": CHANNEL_NAMES, "plate_layout": str(layout) if layout.is_file() else None}
