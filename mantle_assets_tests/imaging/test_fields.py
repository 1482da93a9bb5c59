"""Tests for grouping image files into fields of view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mantle_assets.imaging.fields import (
    Field,
    FieldGrouping,
    ImageDirectoryError,
    group_fields,
    list_image_files,
    read_field,
)
from mantle_assets.imaging.io import ImageReadError
from mantle_assets_tests.imaging.test_io import SHAPE, ramp, write_tif

UUID = "051DAA7C-7042-435F-99F0-1E7AA0D2E4F9"
UUID2 = "9A2C11D4-0B3E-4F7A-8C61-5D0E2B7F3A10"


# --------------------------------------------------------------------------- per-channel schemes


@pytest.mark.parametrize(
    ("scheme", "names", "fields", "labels"),
    [
        (
            "bbbc014",
            {
                "01-A-01": ["Channel1-01-A-01.tif", "Channel2-01-A-01.tif"],
                "01-A-02": ["Channel1-01-A-02.tif", "Channel2-01-A-02.tif"],
            },
            ["01-A-01", "01-A-02"],
            ("Channel1", "Channel2"),
        ),
        (
            "channel-prefix",
            {"img7": ["Channel1_img7.tif", "Channel2_img7.tif"], "img8": ["Channel1_img8.tif", "Channel2_img8.tif"]},
            ["img7", "img8"],
            ("Channel1", "Channel2"),
        ),
        (
            "w-suffix",
            {"img7": ["img7_w1.tif", "img7_w2.tif"], "img8": ["img8_w1.tif", "img8_w2.tif"]},
            ["img7", "img8"],
            ("w1", "w2"),
        ),
        (
            "metaxpress",
            {
                "IXMtest_A02_s1": ["IXMtest_A02_s1_w1.tif", "IXMtest_A02_s1_w2.tif"],
                "IXMtest_A02_s2": ["IXMtest_A02_s2_w1.tif", "IXMtest_A02_s2_w2.tif"],
            },
            ["IXMtest_A02_s1", "IXMtest_A02_s2"],
            ("w1", "w2"),
        ),
        (
            "metaxpress",
            {
                "IXMtest_A02_s1": [f"IXMtest_A02_s1_w1{UUID}.tif", f"IXMtest_A02_s1_w2{UUID2}.tif"],
                "IXMtest_B03_s1": [f"IXMtest_B03_s1_w1{UUID}.tif", f"IXMtest_B03_s1_w2{UUID2}.tif"],
            },
            ["IXMtest_A02_s1", "IXMtest_B03_s1"],
            ("w1", "w2"),
        ),
        (
            "c-suffix",
            {"img1": ["img1_c0.tif", "img1_c1.tif"], "img2": ["img2_c0.tif", "img2_c1.tif"]},
            ["img1", "img2"],
            ("c0", "c1"),
        ),
        (
            "ch-suffix",
            {"pos01": ["pos01_ch00.tif", "pos01_ch01.tif"], "pos02": ["pos02_ch00.tif", "pos02_ch01.tif"]},
            ["pos01", "pos02"],
            ("ch00", "ch01"),
        ),
    ],
)
def test_per_channel_schemes(tmp_path, scheme, names, fields, labels):
    for f, (_field, files) in enumerate(names.items()):
        for c, name in enumerate(files):
            write_tif(tmp_path / name, ramp(100 * c + f, np.uint16))

    grouping = group_fields(tmp_path)

    assert grouping.scheme == scheme
    assert grouping.directory == tmp_path
    assert [field.name for field in grouping.fields] == fields
    assert grouping.channel_labels == labels
    assert grouping.n_channels == 2
    assert grouping.fields[0].files == tuple(tmp_path / n for n in names[fields[0]])
    metadata = json.loads(json.dumps(grouping.to_metadata()))
    assert {key: metadata[key] for key in ("scheme", "n_fields", "n_channels", "channel_labels", "fields")} == {
        "scheme": scheme,
        "n_fields": 2,
        "n_channels": 2,
        "channel_labels": list(labels),
        "fields": names,
    }
    assert metadata["wells"] == {field.name: field.well for field in grouping.fields}
    for f, field in enumerate(grouping.fields):
        pixels = read_field(field)
        assert pixels.shape == (2, *SHAPE)
        assert pixels.dtype == np.uint16
        np.testing.assert_array_equal(pixels[0], ramp(f, np.uint16))
        np.testing.assert_array_equal(pixels[1], ramp(100 + f, np.uint16))


def test_channel_labels_sort_naturally(tmp_path):
    for c in (10, 2, 1):
        write_tif(tmp_path / f"Channel{c}-01-A-01.tif", ramp(c))
    grouping = group_fields(tmp_path)
    assert grouping.channel_labels == ("Channel1", "Channel2", "Channel10")
    assert [f.name for f in grouping.fields[0].files] == [
        "Channel1-01-A-01.tif",
        "Channel2-01-A-01.tif",
        "Channel10-01-A-01.tif",
    ]
    np.testing.assert_array_equal(read_field(grouping.fields[0])[:, 0, 0], [1, 2, 10])


def test_fields_sort_naturally(tmp_path):
    for s in (10, 2, 1):
        for w in (1, 2):
            write_tif(tmp_path / f"plate_A01_s{s}_w{w}.tif", ramp())
    names = [f.name for f in group_fields(tmp_path).fields]
    assert names == ["plate_A01_s1", "plate_A01_s2", "plate_A01_s10"]


def test_per_channel_png_files_and_grey_rgb(tmp_path):
    Image.fromarray(ramp(1)).save(tmp_path / "f_c0.png")
    grey_rgb = np.repeat(ramp(2)[..., None], 3, axis=-1)
    Image.fromarray(grey_rgb).save(tmp_path / "f_c1.png")
    pseudo_coloured = np.zeros((*SHAPE, 3), np.uint8)
    pseudo_coloured[..., 2] = ramp(3)  # e.g. DAPI exported in the blue channel only
    Image.fromarray(pseudo_coloured).save(tmp_path / "f_c2.png")

    grouping = group_fields(tmp_path)
    assert grouping.scheme == "c-suffix"
    pixels = read_field(grouping.fields[0])
    assert pixels.shape == (3, *SHAPE) and pixels.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(pixels[c], ramp(c + 1))


def test_per_channel_colour_file_is_refused_on_read(tmp_path):
    write_tif(tmp_path / "f_c0.tif", ramp())
    colour = np.stack([ramp(0), ramp(1), ramp(2)], axis=-1)
    Image.fromarray(colour).save(tmp_path / "f_c1.png")
    grouping = group_fields(tmp_path)
    with pytest.raises(ImageDirectoryError, match=r"f_c1\.png.*colour"):
        read_field(grouping.fields[0])


def test_per_channel_mixed_dtypes_are_promoted(tmp_path):
    write_tif(tmp_path / "f_c0.tif", ramp(0, np.uint8))
    write_tif(tmp_path / "f_c1.tif", ramp(1000, np.uint16))
    pixels = read_field(group_fields(tmp_path).fields[0])
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels[0], ramp(0, np.uint16))
    np.testing.assert_array_equal(pixels[1], ramp(1000, np.uint16))


def test_single_label_of_a_generic_suffix_is_one_file_per_field(tmp_path):
    write_tif(tmp_path / "img_s1_w1.tif", ramp())
    write_tif(tmp_path / "img_s2_w1.tif", ramp())
    grouping = group_fields(tmp_path)
    assert grouping.scheme == "one-file-per-field"
    assert [f.name for f in grouping.fields] == ["img_s1_w1", "img_s2_w1"]


def test_single_wavelength_of_an_instrument_scheme_is_that_scheme(tmp_path):
    write_tif(tmp_path / "A01_s1_w1.tif", ramp())
    write_tif(tmp_path / "A01_s2_w1.tif", ramp())
    grouping = group_fields(tmp_path)
    assert (grouping.scheme, grouping.channel_labels) == ("metaxpress", ("w1",))
    assert [(f.name, f.well, f.site) for f in grouping.fields] == [("A01_s1", "A01", "s1"), ("A01_s2", "A01", "s2")]


def test_a_stray_file_among_channel_files_is_refused(tmp_path):
    # Per-channel grouping needs every file to match; one stray file must not turn channels into fields.
    write_tif(tmp_path / "x_c0.tif", ramp())
    write_tif(tmp_path / "x_c1.tif", ramp())
    write_tif(tmp_path / "overview.tif", ramp())
    with pytest.raises(ImageDirectoryError, match="x_c0 and x_c1 differ only by what looks like a channel"):
        group_fields(tmp_path)


# --------------------------------------------------------------------------- one file per field


def test_rgb_png_fields(tmp_path):
    rgb = np.stack([ramp(0), ramp(50), ramp(100)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "b.png")
    Image.fromarray(rgb[::-1].copy()).save(tmp_path / "a.PNG")

    grouping = group_fields(tmp_path)
    assert grouping.scheme == "one-file-per-field"
    assert [f.name for f in grouping.fields] == ["a", "b"]
    assert grouping.channel_labels == ("1", "2", "3")
    metadata = grouping.to_metadata()
    assert {key: metadata[key] for key in ("scheme", "n_fields", "n_channels", "channel_labels", "fields")} == {
        "scheme": "one-file-per-field",
        "n_fields": 2,
        "n_channels": 3,
        "channel_labels": ["1", "2", "3"],
        "fields": {"a": ["a.PNG"], "b": ["b.png"]},
    }
    pixels = read_field(grouping.fields[1])
    assert pixels.shape == (3, *SHAPE) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.moveaxis(rgb, -1, 0))


def test_ome_suffix_is_not_part_of_the_field_name(tmp_path):
    write_tif(tmp_path / "well_A01.ome.tif", ramp())
    assert [f.name for f in group_fields(tmp_path).fields] == ["well_A01"]


# --------------------------------------------------------------------------- listing


def test_list_image_files(tmp_path):
    for name in ["b.TIF", "a.png", "c.jpeg", "d.bmp", "e.tiff", "f.JPG", ".hidden.tif", "._a.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.tif").mkdir()
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "z.tif").write_bytes(b"x")
    (tmp_path / ".hidden folder").mkdir()
    (tmp_path / ".hidden folder" / "y.tif").write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)] == [
        "a.png", "b.TIF", "c.jpeg", "d.bmp", "e.tiff", "f.JPG", "nested/z.tif"
    ]


def test_hidden_files_do_not_break_grouping(tmp_path):
    write_tif(tmp_path / "f_c0.tif", ramp())
    write_tif(tmp_path / "f_c1.tif", ramp())
    (tmp_path / "._f_c0.tif").write_bytes(b"\x00" * 10)  # macOS resource fork
    (tmp_path / "README.txt").write_text("plate notes")
    assert group_fields(tmp_path).scheme == "c-suffix"


def test_field_accepts_lists_and_strings(tmp_path):
    field = Field("x", [str(tmp_path / "a.tif")])
    assert field.files == (tmp_path / "a.tif",)
    assert hash(field)


def test_metadata_of_hand_built_grouping_outside_directory(tmp_path):
    grouping = FieldGrouping(tmp_path / "d", "one-file-per-field", (Field("x", (Path("/elsewhere/x.tif"),)),), ("1",))
    assert grouping.to_metadata()["fields"] == {"x": ["/elsewhere/x.tif"]}


# --------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    with pytest.raises(ImageDirectoryError, match=r"nope.*does not exist"):
        group_fields(tmp_path / "nope")


def test_not_a_directory(tmp_path):
    path = write_tif(tmp_path / "x.tif", ramp())
    with pytest.raises(ImageDirectoryError, match=r"x\.tif is not a directory"):
        group_fields(path)


def test_empty_directory(tmp_path):
    with pytest.raises(ImageDirectoryError, match=r"no images in .*: expected TIFF, PNG, JPEG or BMP files"):
        group_fields(tmp_path)


def test_directory_with_non_images_only(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ImageDirectoryError, match=f"no images in {tmp_path}"):
        group_fields(tmp_path)


def test_missing_channel_file(tmp_path):
    write_tif(tmp_path / "Channel1-01-A-01.tif", ramp())
    write_tif(tmp_path / "Channel2-01-A-01.tif", ramp())
    write_tif(tmp_path / "Channel1-02-A-02.tif", ramp())
    message = r": field 02-A-02 has no Channel2 file, though Channel2-01-A-01\.tif is one \(scheme bbbc014\); "
    with pytest.raises(ImageDirectoryError, match=message) as info:
        group_fields(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_duplicate_channel_file(tmp_path):
    write_tif(tmp_path / f"X_A01_s1_w1{UUID}.tif", ramp())
    write_tif(tmp_path / f"X_A01_s1_w1{UUID.replace('0', '1')}.tif", ramp())
    write_tif(tmp_path / "X_A01_s1_w2.tif", ramp())
    with pytest.raises(ImageDirectoryError, match=r"field X_A01_s1 has two w1 files"):
        group_fields(tmp_path)


def test_duplicate_field_name(tmp_path):
    write_tif(tmp_path / "a.tif", ramp())
    Image.fromarray(ramp()).save(tmp_path / "a.png")
    with pytest.raises(ImageDirectoryError, match=r"two files give field a: a\.png, a\.tif"):
        group_fields(tmp_path)


def test_zero_byte_file(tmp_path):
    write_tif(tmp_path / "a.tif", ramp())
    (tmp_path / "b.tif").write_bytes(b"")
    with pytest.raises(ImageDirectoryError, match=r"b\.tif: the file is empty"):
        group_fields(tmp_path)


def test_mixed_shapes_between_channels(tmp_path):
    write_tif(tmp_path / "f_ch00.tif", ramp())
    write_tif(tmp_path / "f_ch01.tif", ramp(shape=(10, 10)))
    with pytest.raises(ImageDirectoryError, match=r"field f: .*f_ch01\.tif is 10x10 but f_ch00\.tif is 8x9"):
        group_fields(tmp_path)


def test_mixed_channel_counts_between_fields(tmp_path):
    Image.fromarray(np.stack([ramp()] * 3, axis=-1)).save(tmp_path / "a.png")
    Image.fromarray(ramp()).save(tmp_path / "b.png")
    with pytest.raises(ImageDirectoryError, match=r"mixed channel counts: a\.png has 3 .* b\.png has 1"):
        group_fields(tmp_path)


def test_multi_channel_per_channel_file(tmp_path):
    write_tif(tmp_path / "f_c0.tif", ramp())
    write_tif(tmp_path / "f_c1.tif", np.stack([ramp(), ramp()]), photometric="minisblack")
    with pytest.raises(ImageDirectoryError, match=r"f_c1\.tif: holds 2 channels"):
        group_fields(tmp_path)


def test_read_field_without_files():
    with pytest.raises(ImageDirectoryError, match="field x has no files"):
        read_field(Field("x", ()))


def test_read_field_missing_file(tmp_path):
    with pytest.raises(ImageDirectoryError, match=r"cannot read image .*gone\.tif"):
        read_field(Field("x", (tmp_path / "gone.tif",)))


def test_reader_errors_are_image_directory_errors():
    # One error class: every `except ImageDirectoryError` catches what the image reader raises.
    assert ImageDirectoryError is ImageReadError


@pytest.mark.parametrize("names", [["f_c0.tif", "f_c1.tif"], ["f.tif"]])
def test_pixel_limit_is_given_to_the_reader(tmp_path, names):
    for name in names:
        write_tif(tmp_path / name, ramp())
    field = group_fields(tmp_path, max_pixels=72).fields[0]
    over = rf"{names[0]}: 8x9 = 72 pixels per channel exceeds the limit of 71 \(MANTLE_MAX_FIELD_PIXELS\)"
    with pytest.raises(ImageDirectoryError, match=over):
        group_fields(tmp_path, max_pixels=71)
    with pytest.raises(ImageDirectoryError, match=over):
        read_field(field, max_pixels=71)
