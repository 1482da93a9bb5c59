"""Real instrument layouts: two BBBC014 wells renamed as each instrument names its files.

Every layout must group into the same two fields of two channels as BBBC014's own names, with the
wells parsed, and segmenting the DNA channel must find the same nuclei; layouts that cannot be read
unambiguously must be refused with one line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mantle_assets.imaging.fields import ImageDirectoryError, group_fields, read_field
from mantle_assets_tests.conftest import CROP, TWO_WELLS, bbbc014_images, missing_data

GUID = "051DAA7C-7042-435F-99F0-1E4AD1E4C1AB"

# Scheme -> (relative path of channel c (1 = NF-kB, 2 = DNA) of well <row><column>, labels in channel order).
# IN Cell labels sort alphabetically: "Blue - FITC" (NF-kB) before "UV - DAPI" (DNA).
LAYOUTS = {
    "bbbc014": (lambda n, r, c, ch: f"Channel{ch}-{n:02d}-{r}-{c:02d}.tif", ("Channel1", "Channel2")),
    "metaxpress": (lambda n, r, c, ch: f"TimePoint_1/Plate1_{r}{c:02d}_s1_w{ch}{GUID}.tif", ("w1", "w2")),
    "imagexpress": (lambda n, r, c, ch: f"Plate1_t1_{r}{c:02d}_s1_w{ch}_z1.tif", ("w1", "w2")),
    "operetta": (
        lambda n, r, c, ch: f"r{ord(r) - 64:02d}c{c:02d}f01p01-ch{ch}sk1fk1fl1.tiff", ("ch1", "ch2")
    ),
    "yokogawa": (lambda n, r, c, ch: f"Plate1_{r}{c:02d}_T0001F001L01A0{ch}Z01C0{ch}.tif", ("C01", "C02")),
    "cellomics": (lambda n, r, c, ch: f"MFGTMP_1503_{r}{c:02d}f00d{ch - 1}.TIF", ("d0", "d1")),
    "incell": (
        lambda n, r, c, ch: f"{r} - {c:02d}(fld 1 wv {('Blue - FITC', 'UV - DAPI')[ch - 1]}).tif",
        ("Blue - FITC", "UV - DAPI"),
    ),
}


def well_parts(well: str) -> tuple[int, str, int]:
    number, row, column = well.split("-")
    return int(number), row, int(column)


@pytest.fixture(scope="module")
def crops() -> dict[tuple[str, int], np.ndarray]:
    """(well "01-A-01", channel) -> the BBBC014 crop."""
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found (set MANTLE_DEMO_DATA)")
    return {
        (well, channel): np.ascontiguousarray(tifffile.imread(images / f"Channel{channel}-{well}.tif")[CROP])
        for well in TWO_WELLS
        for channel in (1, 2)
    }


def write_plate(root: Path, scheme: str, crops, *, name=None) -> Path:
    name_of = name or LAYOUTS[scheme][0]
    for (well, channel), pixels in crops.items():
        path = root / name_of(*well_parts(well), channel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, pixels)
    return root


@pytest.mark.parametrize("scheme", sorted(LAYOUTS))
def test_each_instrument_layout_groups_like_bbbc014(tmp_path, crops, scheme):
    grouping = group_fields(write_plate(tmp_path / scheme, scheme, crops))
    assert grouping.scheme == scheme
    assert grouping.channel_labels == LAYOUTS[scheme][1]
    assert [field.well for field in grouping.fields] == ["A01", "A12"]
    for field, well in zip(grouping.fields, TWO_WELLS, strict=True):
        np.testing.assert_array_equal(read_field(field), np.stack([crops[(well, 1)], crops[(well, 2)]]))
    summary = grouping.describe()
    assert summary.startswith("2 fields x 2 channels (") and summary.endswith(f"scheme {scheme}")
    assert "wells A01, A12" in summary


def test_the_summary_says_what_was_found(tmp_path, crops):
    grouping = group_fields(write_plate(tmp_path / "operetta", "operetta", crops))
    assert grouping.describe() == (
        "2 fields x 2 channels (ch1, ch2), wells A01, A12, plane p01, time point sk1, scheme operetta"
    )
    metadata = grouping.to_metadata()
    assert metadata["wells"] == {"r01c01f01": "A01", "r01c12f01": "A12"}
    assert (metadata["scheme"], metadata["summary"]) == ("operetta", grouping.describe())


def test_metaxpress_thumbnails_are_ignored(tmp_path, crops):
    plate = write_plate(tmp_path / "ixm", "metaxpress", crops)
    for path in list(plate.rglob("*.tif")):
        thumb = path.with_name(path.stem.replace(GUID, "") + f"_thumb{GUID}.tif")
        tifffile.imwrite(thumb, np.zeros((16, 16), np.uint8))
    grouping = group_fields(plate)
    assert (grouping.scheme, len(grouping.fields), grouping.n_channels) == ("metaxpress", 2, 2)
    assert not any("_thumb" in f.name for field in grouping.fields for f in field.files)


def test_a_plate_with_one_sub_folder_per_well_is_one_image_directory(tmp_path, crops):
    def per_well(n, r, c, ch):
        return f"{r}{c:02d}/Plate1_{r}{c:02d}_s1_w{ch}.tif"

    grouping = group_fields(write_plate(tmp_path / "wells", "metaxpress", crops, name=per_well))
    assert [(field.name, field.well) for field in grouping.fields] == [
        ("A01_Plate1_A01_s1", "A01"),
        ("A12_Plate1_A12_s1", "A12"),
    ]
    assert grouping.channel_labels == ("w1", "w2")


def test_a_user_pattern_groups_names_no_scheme_knows(tmp_path, crops):
    def lab_names(n, r, c, ch):
        return f"{r}{c}-{('GFP', 'Hoechst')[ch - 1]}.png"

    plate = tmp_path / "lab"
    for (well, channel), pixels in crops.items():
        plate.mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(pixels).save(plate / lab_names(*well_parts(well), channel))
    with pytest.raises(ImageDirectoryError, match="differ only by what looks like a channel"):
        group_fields(plate)
    grouping = group_fields(plate, naming_pattern=r"(?P<well>[A-H]\d+)-(?P<channel>\w+)")
    assert (grouping.scheme, grouping.channel_labels) == ("pattern", ("GFP", "Hoechst"))
    assert [field.well for field in grouping.fields] == ["A01", "A12"]
    assert grouping.to_metadata()["naming_pattern"] == r"(?P<well>[A-H]\d+)-(?P<channel>\w+)"


def test_files_a_user_pattern_does_not_match_are_refused(tmp_path, crops):
    plate = write_plate(tmp_path / "cellomics", "cellomics", crops)
    with pytest.raises(ImageDirectoryError, match=r"4 of 4 image files do not match the naming pattern"):
        group_fields(plate, naming_pattern=r"(?P<well>[A-H]\d\d)_(?P<channel>w\d)")


# --------------------------------------------------------------------------- refusals


def one_line_refusal(directory: Path, match: str) -> str:
    with pytest.raises(ImageDirectoryError, match=match) as caught:
        group_fields(directory)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("names", "pair"),
    [
        # Cellomics-like d0/d1 without a well no scheme reads: never one field per channel.
        (["A1f00d0.tif", "A1f00d1.tif"], ("A1f00d0", "A1f00d1")),
        (["pos1 ch1.tif", "pos1 ch2.tif"], ("pos1 ch1", "pos1 ch2")),
        (["sample-C01.tif", "sample-C02.tif"], ("sample-C01", "sample-C02")),
        (["img(wv UV - DAPI).tif", "img(wv Blue - FITC).tif"], ("img(wv Blue - FITC)", "img(wv UV - DAPI)")),
    ],
)
def test_one_file_per_field_is_refused_when_names_differ_by_a_channel_token(tmp_path, names, pair):
    for name in names:
        tifffile.imwrite(tmp_path / name, np.zeros((8, 8), np.uint8))
    message = one_line_refusal(tmp_path, "differ only by what looks like a channel")
    assert all(name in message for name in pair)
    assert "--pattern" in message


@pytest.mark.parametrize(
    ("names", "what"),
    [
        ([f"r01c01f01p0{p}-ch1sk1fk1fl1.tiff" for p in (1, 2, 3)], "z-planes"),
        ([f"r01c01f01p01-ch1sk{t}fk1fl1.tiff" for t in (1, 2)], "time points"),
        ([f"P_A01_T0001F001L01A01Z0{z}C01.tif" for z in (1, 2)], "z-planes"),
        ([f"TimePoint_{t}/P_A01_s1_w1.tif" for t in (1, 2)], "time points"),
        ([f"ZStep_{z}/P_A01_s1_w1.tif" for z in (1, 2)], "z-planes"),
        (["stack_z01.tif", "stack_z02.tif"], "plane or time point"),
    ],
)
def test_z_stacks_and_time_series_are_refused_by_name(tmp_path, names, what):
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp_path / name, np.zeros((8, 8), np.uint8))
    one_line_refusal(tmp_path, re.escape(what))


def test_fields_with_different_channel_sets_are_refused_naming_two_files(tmp_path, crops):
    plate = write_plate(tmp_path / "operetta", "operetta", crops)
    (plate / "r01c12f01p01-ch2sk1fk1fl1.tiff").unlink()
    message = one_line_refusal(plate, "field r01c12f01 has no ch2 file")
    assert "r01c01f01p01-ch2sk1fk1fl1.tiff" in message and "--pattern" in message


def test_a_symbolic_link_to_a_folder_is_refused(tmp_path, crops):
    plate = write_plate(tmp_path / "plate", "bbbc014", crops)
    elsewhere = write_plate(tmp_path / "elsewhere", "bbbc014", crops)
    (plate / "more").symlink_to(elsewhere, target_is_directory=True)
    one_line_refusal(plate, "a symbolic link to a folder")


def test_names_mixing_files_with_and_without_a_channel_are_refused(tmp_path, crops):
    plate = write_plate(tmp_path / "ixm", "metaxpress", crops)
    shutil.copy(next(plate.rglob("*_w1*.tif")), plate / "TimePoint_1" / "Plate1_B02_s1.tif")
    one_line_refusal(plate, "names no channel but")


@pytest.mark.slow
def test_segmenting_the_dna_channel_finds_the_same_nuclei_under_every_layout(tmp_path, crops, bundled_model_name):
    from mantle_assets.imaging.pipeline import segment_directory
    from mantle_assets.imaging.segmentation import CellposeSegmenter, SegmentationSettings
    from mantle_assets.models.registry import resolve_model

    segmenter = CellposeSegmenter(resolve_model(bundled_model_name).path, gpu=False)
    counts = {}
    for scheme in sorted(LAYOUTS):
        grouping = group_fields(write_plate(tmp_path / scheme, scheme, crops))
        output = tmp_path / f"{scheme} masks"
        output.mkdir()
        result = segment_directory(
            grouping, segmenter, nuclei_channel=2, cytoplasm_channel=2,
            settings=SegmentationSettings(diameter=17.0), output_dir=output,
        )
        outcomes = zip(grouping.fields, result.fields, strict=True)
        counts[scheme] = {field.well: outcome.cells for field, outcome in outcomes}
    assert all(cells >= 5 for cells in counts["bbbc014"].values()), counts
    assert all(per_well == counts["bbbc014"] for per_well in counts.values()), counts
