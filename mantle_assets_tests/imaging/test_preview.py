import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mantle_assets.imaging.fields import Field, FieldGrouping
from mantle_assets.imaging.pipeline import sheet_indices
from mantle_assets.imaging.preview import (
    CELL_OUTLINE_COLOUR,
    LABEL_COLOUR,
    LABEL_HEIGHT,
    OUTLINE_COLOUR,
    SHEET_BACKGROUND,
    TILE_GAP,
    contact_sheet,
    outline_overlay,
    outline_thumbnail,
    png_bytes,
    spread_indices,
    to_display,
)


def test_display_scaling_clips_to_percentiles():
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    shown = to_display(image, 10, 90)
    assert shown.dtype == np.uint8
    assert shown.min() == 0 and shown.max() == 255
    assert shown[0, 5] == 0 and shown[9, 5] == 255


def test_outlines_trace_each_object_boundary_only():
    masks = np.zeros((20, 20), dtype=np.int32)
    masks[5:10, 5:10] = 1
    rgb = outline_overlay(np.zeros((20, 20)), masks)
    coloured = np.all(rgb == OUTLINE_COLOUR, axis=-1)
    assert coloured[5, 5:10].all() and coloured[9, 5:10].all()
    assert not coloured[7, 7]  # interior stays grey
    assert coloured.sum() == 16  # the 5x5 square's perimeter


def test_nuclei_and_cells_are_outlined_in_two_colours():
    # A 4 px nucleus inside a 10 px cell, their top edges on the same row (nucleus at 3:7, cell at 3:13).
    nuclei = np.zeros((20, 20), np.int32)
    nuclei[3:7, 3:7] = 1
    cells = np.zeros((20, 20), np.int32)
    cells[3:13, 3:13] = 1
    rgb = outline_overlay(np.zeros((20, 20)), nuclei, cells)
    red, cyan = np.all(rgb == OUTLINE_COLOUR, axis=-1), np.all(rgb == CELL_OUTLINE_COLOUR, axis=-1)
    assert red.sum() == 12  # the nucleus's whole perimeter, on top where the cell's runs along it
    assert red[3, 3:7].all() and red[3:7, 3].all()
    assert cyan.sum() == 36 - 7  # the cell's perimeter less the 7 pixels it shares with the nucleus
    assert cyan[12, 3:13].all() and cyan[3, 7:13].all() and not cyan[3, 3:7].any()
    assert not (red | cyan)[9, 9] and not (red | cyan)[0, 0]


def test_a_thumbnail_shrinks_the_cells_with_the_nuclei():
    image, nuclei = square_field()  # the nucleus: 80 px at (160, 320), a 20 px square at the tile's scale
    cells = np.zeros_like(nuclei)
    cells[120:280, 280:440] = 1  # 160 px around it: 40 px at the tile's scale, at (30, 70)
    tile = outline_thumbnail(image, nuclei, 160, cells=cells)
    cyan = np.all(tile == CELL_OUTLINE_COLOUR, axis=-1)
    assert cyan[30, 70:110].all() and cyan[69, 70:110].all() and cyan.sum() == 4 * 40 - 4
    assert np.all(tile == OUTLINE_COLOUR, axis=-1).sum() == 4 * 20 - 4


def test_cells_must_match_the_masks_shape():
    with pytest.raises(ValueError, match=r"cells of shape \(10, 10\) for masks of shape \(20, 20\)"):
        outline_overlay(np.zeros((20, 20)), np.zeros((20, 20), int), np.zeros((10, 10), int))


def test_png_is_shrunk_to_the_maximum_size():
    data = png_bytes(np.zeros((1000, 500, 3), dtype=np.uint8), max_size=200)
    with Image.open(io.BytesIO(data)) as picture:
        assert picture.format == "PNG"
        assert picture.size == (100, 200)


def square_field(size=640, side=80, top=160, left=320):
    """A dark field with one bright square object and its label image."""
    image = np.zeros((size, size), np.float32)
    masks = np.zeros((size, size), np.int32)
    image[top : top + side, left : left + side] = 1.0
    masks[top : top + side, left : left + side] = 1
    return image, masks


def test_thumbnail_keeps_one_pixel_outlines_at_its_own_scale():
    image, masks = square_field()  # a 640 px field, 80 px square at (160, 320)
    tile = outline_thumbnail(image, masks, 160)  # shrunk four times
    assert tile.shape == (160, 160, 3)
    coloured = np.all(tile == OUTLINE_COLOUR, axis=-1)
    # The square is 20 px at the tile's scale, at (40, 80): its perimeter in full, its inside white.
    assert coloured[40, 80:100].all() and coloured[59, 80:100].all() and coloured[40:60, 80].all()
    assert coloured.sum() == 4 * 20 - 4
    assert np.all(tile[50, 90] == 255) and np.all(tile[0, 0] == 0)


def test_thumbnail_of_an_elongated_field_bounds_its_longer_side():
    tile = outline_thumbnail(np.random.default_rng(0).random((30, 1000)), np.zeros((30, 1000), int), 160)
    assert tile.shape == (5, 143, 3)  # shrunk seven times, both sides rounded up


def text_pixels(rgb):
    """Where anti-aliased label text is drawn: nearer the label colour than the background."""
    return np.abs(rgb.astype(int) - LABEL_COLOUR).sum(-1) < np.abs(rgb.astype(int) - SHEET_BACKGROUND).sum(-1)


def test_contact_sheet_puts_each_tile_in_its_cell_under_its_label():
    tiles = [np.full((20, 30, 3), value, np.uint8) for value in range(10, 100, 10)]  # 9 tiles
    sheet = contact_sheet(tiles, [f"A0{i} s1" for i in range(9)], columns=4)
    cell_height, cell_width = LABEL_HEIGHT + 20 + TILE_GAP, 30 + TILE_GAP
    assert sheet.shape == (3 * cell_height - TILE_GAP, 4 * cell_width - TILE_GAP, 3)  # 4 + 4 + 1
    for index, tile in enumerate(tiles):
        top, left = (index // 4) * cell_height, (index % 4) * cell_width
        assert np.array_equal(sheet[top + LABEL_HEIGHT : top + cell_height - TILE_GAP, left : left + 30], tile)
        band = sheet[top : top + LABEL_HEIGHT, left : left + 30]
        assert text_pixels(band).sum() >= 10  # the label's text is drawn
    empty = sheet[2 * cell_height :, cell_width:]  # the last row's three unused cells
    assert np.all(empty == SHEET_BACKGROUND)


def test_contact_sheet_labels_are_cut_to_the_tile_width():
    tile = np.zeros((10, 40, 3), np.uint8)
    short = contact_sheet([tile], ["A01"])
    long = contact_sheet([tile], ["A01 a field name far wider than forty pixels"])
    text_columns = np.flatnonzero(text_pixels(long).any(axis=0))
    assert text_columns.max() < 40 - 1  # drawn within its tile, ellipsis included
    assert text_pixels(short).sum() < text_pixels(long).sum()


def test_contact_sheet_needs_one_label_per_tile():
    with pytest.raises(ValueError, match="2 tiles and 1 labels"):
        contact_sheet([np.zeros((4, 4, 3), np.uint8)] * 2, ["A01"])


def test_sixteen_noisy_fields_make_a_png_under_a_megabyte():
    rng = np.random.default_rng(0)
    tiles = [outline_thumbnail(rng.random((960, 960)), rng.integers(0, 400, (960, 960)), 160) for _ in range(16)]
    sheet = contact_sheet(tiles, [f"B{i:02d} r02c{i:02d}f01: 399" for i in range(16)])
    data = png_bytes(sheet, max(sheet.shape), colours=256)
    with Image.open(io.BytesIO(data)) as picture:
        assert (
            picture.size
            == (sheet.shape[1], sheet.shape[0])
            == (4 * 160 + 3 * TILE_GAP, 4 * (LABEL_HEIGHT + 160) + 3 * TILE_GAP)
        )
    assert len(data) < 1_000_000  # noise is the worst case for PNG; real fields compress to about a quarter


def test_spread_indices_take_first_and_last_and_space_the_rest_evenly():
    assert spread_indices(5, 16) == [0, 1, 2, 3, 4]
    picks = spread_indices(96, 16)
    assert len(picks) == 16 and picks[0] == 0 and picks[-1] == 95
    assert set(np.diff(picks)) <= {6, 7}


def test_sheet_fields_are_spread_over_the_wells_in_plate_order():
    # Names that sort otherwise than the plate: B01's fields come first by name.
    wells = {"a": "B01", "b": "A02", "c": "A01"}
    fields = tuple(
        Field(f"{prefix}{site:02d}", (Path(f"{prefix}{site:02d}.tif"),), well, f"s{site}")
        for prefix, well in wells.items()
        for site in range(10)
    )
    grouping = FieldGrouping(Path("plate"), "pattern", fields, ("1",))
    # 30 fields in plate order A01 (c00-c09), A02 (b00-b09), B01 (a00-a09); positions 0, 10, 19, 29.
    assert [fields[i].name for i in sheet_indices(grouping, limit=4)] == ["c00", "b00", "b09", "a09"]
