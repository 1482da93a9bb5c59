"""Tests for the one image reader (fields, masks and training data) and the label image writer."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mantle_assets.imaging.io import (
    MAX_FIELD_PIXELS,
    ImageReadError,
    read_image,
    read_image_header,
    read_label_image,
    write_label_image,
)

SHAPE = (8, 9)  # (Y, X), deliberately non-square to catch transposes; 8 is the smallest side read
LIMIT = MAX_FIELD_PIXELS


def ramp(offset: int = 0, dtype=np.uint8, shape=SHAPE) -> np.ndarray:
    """Distinct, known pixel values per channel."""
    return (np.arange(np.prod(shape)).reshape(shape) + offset).astype(dtype)


def write_tif(path: Path, data: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, data, **kwargs)
    return path


def pixels_of(path: Path) -> np.ndarray:
    return read_image(path, max_pixels=LIMIT).pixels


# --------------------------------------------------------------------------- headers and layouts


def test_header_is_read_without_pixels(tmp_path):
    path = write_tif(tmp_path / "x.tif", np.stack([ramp(c, np.uint16) for c in range(3)]), photometric="minisblack")
    info = read_image_header(path, max_pixels=LIMIT)
    assert (info.path, info.shape, info.n_channels, info.dtype, info.lossy) == (path, SHAPE, 3, np.uint16, False)
    assert info.pixels is None
    read = read_image(path, max_pixels=LIMIT)
    assert read.shape == info.shape and read.n_channels == info.n_channels
    np.testing.assert_array_equal(read.pixels, np.stack([ramp(c, np.uint16) for c in range(3)]))


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.stack([ramp(0), ramp(1), ramp(2), np.full(SHAPE, 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "x.png")
    assert read_image_header(tmp_path / "x.png", max_pixels=LIMIT).n_channels == 3
    np.testing.assert_array_equal(pixels_of(tmp_path / "x.png"), np.moveaxis(rgba[..., :3], -1, 0))


def test_rgba_tiff_drops_declared_alpha(tmp_path):
    rgba = np.stack([ramp(0), ramp(1), ramp(2), np.full(SHAPE, 255, np.uint8)], axis=-1)
    # metadata=None: a plain RGBA TIFF as image editors write it, not a tifffile array dump.
    path = write_tif(tmp_path / "x.tif", rgba, photometric="rgb", metadata=None)
    assert read_image_header(path, max_pixels=LIMIT).n_channels == 3
    np.testing.assert_array_equal(pixels_of(path), np.moveaxis(rgba[..., :3], -1, 0))


@pytest.mark.filterwarnings("ignore:.*stored as RGB:DeprecationWarning")
def test_four_channel_array_dumped_by_tifffile_keeps_all_channels(tmp_path):
    stack = np.stack([ramp(c, np.uint16) for c in range(4)])
    path = write_tif(tmp_path / "x.tif", stack)  # tifffile tags this RGBA by default
    assert read_image_header(path, max_pixels=LIMIT).n_channels == 4
    np.testing.assert_array_equal(pixels_of(path), stack)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_channel_first_tiff_stack(tmp_path, dtype):
    stack = np.stack([ramp(10 * c, dtype) for c in range(5)])
    path = write_tif(tmp_path / "field.tif", stack, photometric="minisblack")
    assert read_image_header(path, max_pixels=LIMIT).n_channels == 5
    pixels = pixels_of(path)
    assert pixels.dtype == dtype
    np.testing.assert_array_equal(pixels, stack)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_channel_last_tiff_stack(tmp_path, dtype):
    stack = np.stack([ramp(10 * c, dtype) for c in range(2)], axis=-1)
    path = write_tif(tmp_path / "field.tiff", stack, photometric="minisblack")
    pixels = pixels_of(path)
    assert pixels.shape == (2, *SHAPE) and pixels.dtype == dtype
    np.testing.assert_array_equal(pixels, np.moveaxis(stack, -1, 0))


def test_imagej_channel_stack_with_singleton_axes(tmp_path):
    stack = np.stack([ramp(c, np.uint16) for c in range(3)])
    path = write_tif(tmp_path / "ij.tif", stack[np.newaxis], imagej=True, metadata={"axes": "TCYX"})
    np.testing.assert_array_equal(pixels_of(path), stack)


@pytest.mark.parametrize(("dtype", "value"), [(np.uint8, 200), (np.uint16, 60000), (np.float32, 0.25)])
def test_grey_tiff(tmp_path, dtype, value):
    data = ramp(0, dtype)
    data[0, 0] = value
    pixels = pixels_of(write_tif(tmp_path / "g.tif", data))
    assert pixels.shape == (1, *SHAPE) and pixels.dtype == dtype
    np.testing.assert_array_equal(pixels[0], data)


def test_big_endian_tiff_reads_native(tmp_path):
    pixels = pixels_of(write_tif(tmp_path / "be.tif", ramp(300, np.uint16), byteorder=">"))
    assert pixels.dtype == np.dtype(np.uint16)
    np.testing.assert_array_equal(pixels[0], ramp(300, np.uint16))


def test_16_bit_png(tmp_path):
    Image.fromarray(ramp(40000, np.uint16)).save(tmp_path / "g.png")
    pixels = pixels_of(tmp_path / "g.png")
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels[0], ramp(40000, np.uint16))


def test_grey_jpeg(tmp_path):
    data = np.full((16, 16), 120, np.uint8)  # flat, so JPEG keeps it exactly enough
    Image.fromarray(data).save(tmp_path / "g.jpg", quality=95)
    info = read_image(tmp_path / "g.jpg", max_pixels=LIMIT)
    assert info.lossy and info.n_channels == 1
    assert info.pixels.shape == (1, 16, 16) and info.pixels.dtype == np.uint8
    assert np.abs(info.pixels.astype(int) - 120).max() <= 2


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_bmp(tmp_path, mode):
    data = ramp() if mode == "L" else np.stack([ramp(0), ramp(1), ramp(2)], axis=-1)
    Image.fromarray(data).save(tmp_path / "x.bmp")
    expected = data[np.newaxis] if mode == "L" else np.moveaxis(data, -1, 0)
    np.testing.assert_array_equal(pixels_of(tmp_path / "x.bmp"), expected)


def test_palette_png(tmp_path):
    Image.fromarray(ramp()).convert("P").save(tmp_path / "grey.png")  # grey palette
    colour = np.stack([ramp(0), ramp(100), np.zeros(SHAPE, np.uint8)], axis=-1)
    Image.fromarray(colour).quantize(256).save(tmp_path / "colour.png")
    np.testing.assert_array_equal(pixels_of(tmp_path / "grey.png"), ramp()[np.newaxis])
    assert read_image_header(tmp_path / "colour.png", max_pixels=LIMIT).n_channels == 3
    assert pixels_of(tmp_path / "colour.png").shape == (3, *SHAPE)


# --------------------------------------------------------------------------- refusals


def test_zero_byte_file(tmp_path):
    (tmp_path / "b.tif").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"b\.tif: the file is empty"):
        read_image_header(tmp_path / "b.tif", max_pixels=LIMIT)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"cannot read image .*gone\.tif: No such file"):
        read_image(tmp_path / "gone.tif", max_pixels=LIMIT)


@pytest.mark.parametrize("name", ["bad.tif", "bad.png", "bad.jpg", "bad.bmp"])
def test_corrupt_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not an image at all")
    with pytest.raises(ImageReadError, match=f"cannot read image .*{re.escape(name)}") as info:
        read_image_header(tmp_path / name, max_pixels=LIMIT)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keep_bytes", [0, 100])
def test_empty_or_truncated_tiff_is_named(tmp_path, keep_bytes):
    broken = write_tif(tmp_path / "broken.tif", np.arange(4096, dtype=np.uint16).reshape(64, 64))
    broken.write_bytes(broken.read_bytes()[:keep_bytes])
    with pytest.raises(ImageReadError, match="broken.tif"):
        read_image_header(broken, max_pixels=LIMIT)


def test_truncated_png_fails_on_read(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    read_image_header(tmp_path / "t.png", max_pixels=LIMIT)  # the header is intact
    with pytest.raises(ImageReadError, match=r"cannot read image .*t\.png"):
        read_image(tmp_path / "t.png", max_pixels=LIMIT)


def test_z_stack_is_refused(tmp_path):
    path = write_tif(tmp_path / "stack.tif", np.zeros((20, 32, 32), np.uint16))
    with pytest.raises(ImageReadError, match=r"stack\.tif: shape \(20, 32, 32\) looks like a 3-D stack"):
        read_image_header(path, max_pixels=LIMIT)


def test_small_z_stack_with_axes_metadata_is_refused(tmp_path):
    path = write_tif(tmp_path / "z.tif", np.zeros((3, 32, 32), np.uint16), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(ImageReadError, match=r"z\.tif: .*looks like a 3-D stack"):
        read_image_header(path, max_pixels=LIMIT)


def test_four_dimensional_stack_is_refused(tmp_path):
    path = write_tif(tmp_path / "zc.tif", np.zeros((4, 2, 16, 16), np.uint16), photometric="minisblack")
    with pytest.raises(ImageReadError, match=r"zc\.tif: image of shape \(4, 2, 16, 16\) has 4 dimensions"):
        read_image_header(path, max_pixels=LIMIT)


@pytest.mark.parametrize(
    ("dtype", "shown"),
    [
        (np.float64, "float64"),
        (np.int32, "int32"),
        (np.int64, "int64"),
        (np.int16, "int16"),
        (np.uint32, "uint32"),
        (bool, "bool"),
    ],
)
def test_unsupported_tiff_dtype(tmp_path, dtype, shown):
    path = write_tif(tmp_path / "x.tif", np.zeros(SHAPE, dtype))
    with pytest.raises(ImageReadError, match=rf"x\.tif: unsupported pixel type {shown}.*uint8, uint16 or float32$"):
        read_image_header(path, max_pixels=LIMIT)


def test_unsupported_pil_modes(tmp_path):
    Image.fromarray(np.zeros(SHAPE, bool)).save(tmp_path / "mask.png")
    with pytest.raises(ImageReadError, match=r"mask\.png: unsupported pixel type bool"):
        read_image_header(tmp_path / "mask.png", max_pixels=LIMIT)


def test_error_messages_are_one_line(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\xff" * 20)
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "bad.tif", max_pixels=LIMIT)
    assert "\n" not in str(info.value) and "bad.tif" in str(info.value)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_pixel_limit_is_checked_from_the_header(tmp_path, suffix):
    path = tmp_path / f"big{suffix}"
    Image.fromarray(ramp()).save(path)
    assert read_image_header(path, max_pixels=72).shape == SHAPE
    with pytest.raises(ImageReadError) as info:
        read_image_header(path, max_pixels=71)
    assert str(info.value) == (
        f"{path}: 8x9 = 72 pixels per channel exceeds the limit of 71 (MANTLE_MAX_FIELD_PIXELS); "
        "split the image into tiles"
    )


def test_pixel_limit_is_per_channel_plane(tmp_path):
    path = write_tif(tmp_path / "a.tif", np.zeros((3, 8, 8), np.uint16), photometric="minisblack")
    assert read_image(path, max_pixels=64).pixels.shape == (3, 8, 8)
    with pytest.raises(ImageReadError, match=r"a\.tif: 8x8 = 64 pixels per channel exceeds the limit of 63"):
        read_image(path, max_pixels=63)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_memory_budget_is_checked_from_the_header(tmp_path, suffix):
    # Charged: the decoder's array, the (C, Y, X) copy and a float32 copy, per stored channel (alpha included).
    path = tmp_path / f"rgba{suffix}"
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(path)
    needed = 64 * 64 * 4 * (2 * 1 + 4)
    assert read_image_header(path, max_pixels=LIMIT, max_bytes=needed).n_channels == 3
    with pytest.raises(ImageReadError) as info:
        read_image_header(path, max_pixels=LIMIT, max_bytes=needed - 1)
    assert str(info.value) == (
        f"{path}: 64x64 x 4 channel(s) of uint8 takes 96.0 KiB to read and prepare, more than the memory budget "
        "of 96.0 KiB (MANTLE_MAX_IMAGE_BYTES); split the image into tiles"
    )


def test_memory_budget_applies_to_label_images(tmp_path):
    path = tmp_path / "m_cp_masks.tif"
    write_label_image(path, np.full((64, 64), 70000))  # uint32
    with pytest.raises(ImageReadError, match=r"64x64 x 1 channel\(s\) of uint32 takes 48\.0 KiB"):
        read_label_image(path, max_pixels=LIMIT, max_bytes=64 * 64 * 12 - 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_when_decoded(tmp_path, bad):
    data = ramp(dtype=np.float32, shape=(2, *SHAPE))
    data[1, 2:4, 3] = bad
    path = write_tif(tmp_path / "f.tif", data, photometric="minisblack")
    assert read_image_header(path, max_pixels=LIMIT).n_channels == 2  # the header cannot tell
    with pytest.raises(ImageReadError) as info:
        read_image(path, max_pixels=LIMIT)
    assert str(info.value) == (
        f"{path}: 2 of 144 pixel values are NaN or infinite; replace them (e.g. with 0) before registering the images"
    )


def test_smallest_side_is_eight_pixels(tmp_path):
    assert read_image(write_tif(tmp_path / "ok.tif", ramp(shape=(8, 8))), max_pixels=LIMIT).shape == (8, 8)
    path = write_tif(tmp_path / "thin.tif", ramp(shape=(7, 300)))
    with pytest.raises(ImageReadError) as info:
        read_image_header(path, max_pixels=LIMIT)
    assert str(info.value) == f"{path}: a 7x300 image; images must be at least 8 pixels a side"


def test_decoder_messages_do_not_quote_the_file(tmp_path):
    path = tmp_path / "x.tif"
    path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n\x1b[31m")
    with pytest.raises(ImageReadError) as info:
        read_image(path, max_pixels=LIMIT)
    assert str(info.value) == f"cannot read image {path}: not a TIFF file"


# --------------------------------------------------------------------------- label images


@pytest.mark.parametrize("top_label, dtype", [(65535, np.uint16), (65536, np.uint32)])
def test_label_images_widen_to_uint32_only_when_needed(tmp_path, top_label, dtype):
    labels = np.zeros((8, 8), np.int64)
    labels[1, 1] = top_label
    labels[2, 2] = 7
    write_label_image(tmp_path / "m.tif", labels)
    assert tifffile.imread(tmp_path / "m.tif").dtype == dtype
    read = read_label_image(tmp_path / "m.tif", max_pixels=LIMIT)
    assert read.dtype == dtype and read.shape == (8, 8)
    np.testing.assert_array_equal(read, labels)


def test_uint8_labels_are_read(tmp_path):
    path = write_tif(tmp_path / "m.tif", ramp())
    np.testing.assert_array_equal(read_label_image(path, max_pixels=LIMIT), ramp())


def test_palette_label_png_is_read_as_its_indices(tmp_path):
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 1:3], labels[4:, 4:] = 1, 2
    image = Image.fromarray(labels, mode="L").convert("P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))  # black, red, green
    image.save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_label_image(tmp_path / "m.png", max_pixels=LIMIT), labels)


@pytest.mark.parametrize(
    ("dtype", "shown"), [(np.int32, "int32"), (np.int64, "int64"), (np.float32, "float32"), (bool, "bool")]
)
def test_label_images_of_other_types_are_refused(tmp_path, dtype, shown):
    path = write_tif(tmp_path / "m.tif", np.zeros(SHAPE, dtype))
    expected = rf"m\.tif: unsupported pixel type {shown}.*; expected uint8, uint16 or uint32$"
    with pytest.raises(ImageReadError, match=expected):
        read_label_image(path, max_pixels=LIMIT)


def test_multi_channel_label_image_is_refused(tmp_path):
    path = write_tif(tmp_path / "m.tif", np.zeros((2, *SHAPE), np.uint16), photometric="minisblack")
    with pytest.raises(ImageReadError, match=r"m\.tif: holds 2 channels; a label image has one$"):
        read_label_image(path, max_pixels=LIMIT)


def test_jpeg_label_image_is_refused(tmp_path):
    Image.fromarray(ramp()).save(tmp_path / "m.jpg")
    with pytest.raises(ImageReadError, match=r"m\.jpg: a label image stored as JPEG"):
        read_label_image(tmp_path / "m.jpg", max_pixels=LIMIT)


def test_over_the_limit_label_image_is_refused(tmp_path):
    path = tmp_path / "m_cp_masks.tif"
    write_label_image(path, np.ones((64, 64), np.uint16))
    with pytest.raises(ImageReadError) as info:
        read_label_image(path, max_pixels=4095)
    assert str(info.value) == (
        f"{path}: 64x64 = 4096 pixels per channel exceeds the limit of 4095 (MANTLE_MAX_FIELD_PIXELS); "
        "split the image into tiles"
    )


def test_truncated_label_image_is_refused(tmp_path):
    path = tmp_path / "m_cp_masks.tif"
    write_label_image(path, np.random.default_rng(0).integers(0, 60000, (64, 64)))  # random: zlib cannot shrink it
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(ImageReadError, match=rf"^cannot read image {re.escape(str(path))}: the file is truncated"):
        read_label_image(path, max_pixels=LIMIT)
