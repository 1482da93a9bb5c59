import numpy as np
import pytest
import tifffile
from scipy import ndimage

from mantle_assets.imaging.fields import group_fields
from mantle_assets.imaging.io import ImageReadError, write_label_image
from mantle_assets.imaging.measurements import (
    check_channel_names,
    cytoplasm_labels,
    default_channel_names,
    measure_directory,
    measure_objects,
)


def two_squares() -> np.ndarray:
    """A 4x4 nucleus (label 1) and a 6x6 nucleus (label 2), far apart."""
    nuclei = np.zeros((40, 60), dtype=np.int32)
    nuclei[10:14, 10:14] = 1
    nuclei[20:26, 40:46] = 2
    return nuclei


def test_two_squares_give_exact_areas_means_integrals_and_ratio():
    nuclei = two_squares()
    cytoplasm = cytoplasm_labels(nuclei, ring_width=1)
    nfkb = np.full(nuclei.shape, 1.0)
    nfkb[cytoplasm == 1] = 2.0
    nfkb[nuclei == 1] = 8.0
    nfkb[cytoplasm == 2] = 5.0
    nfkb[nuclei == 2] = 10.0
    dna = (nuclei > 0) * np.uint16(100)

    table = measure_objects(nuclei, {"nfkb": nfkb, "dna": dna}, ring_width=1).set_index("label")

    assert table.index.tolist() == [1, 2]
    assert table["area"].tolist() == [16, 36]
    # Within Euclidean distance 1 of an n x n square: the 4n edge neighbours, not the diagonal corners.
    assert table["cytoplasm_area"].tolist() == [16, 24]
    assert table.loc[1, ["centroid_y", "centroid_x"]].tolist() == [11.5, 11.5]
    assert table.loc[2, ["centroid_y", "centroid_x"]].tolist() == [22.5, 42.5]
    assert table["eccentricity"].tolist() == [0.0, 0.0]
    assert table["solidity"].tolist() == [1.0, 1.0]

    assert table["nfkb_nucleus_mean"].tolist() == [8.0, 10.0]
    assert table["nfkb_nucleus_integrated"].tolist() == [8.0 * 16, 10.0 * 36]
    assert table["nfkb_cytoplasm_mean"].tolist() == [2.0, 5.0]
    assert table["nfkb_cytoplasm_integrated"].tolist() == [2.0 * 16, 5.0 * 24]
    assert table["nfkb_ratio"].tolist() == [4.0, 2.0]
    assert table["dna_nucleus_integrated"].tolist() == [1600.0, 3600.0]
    assert table["dna_cytoplasm_mean"].tolist() == [0.0, 0.0]
    assert np.isnan(table["dna_ratio"]).all()  # zero cytoplasm mean


def test_ring_does_not_leak_into_a_neighbour_three_pixels_away():
    nuclei = np.zeros((30, 40), dtype=np.int32)
    nuclei[10:20, 5:15] = 1
    nuclei[10:20, 18:28] = 2  # columns 15, 16, 17 separate them
    ring = cytoplasm_labels(nuclei, ring_width=5)

    assert not (ring[nuclei > 0]).any()
    distance_to = {label: ndimage.distance_transform_edt(nuclei != label) for label in (1, 2)}
    for label, other in ((1, 2), (2, 1)):
        pixels = ring == label
        assert pixels.any()
        assert (distance_to[label][pixels] <= 5).all()
        assert (distance_to[label][pixels] <= distance_to[other][pixels]).all()
    assert set(np.unique(ring[10:20, 15:18])) == {1, 2}


def test_cytoplasm_from_cells_is_the_cell_minus_the_nucleus():
    nuclei = np.zeros((30, 30), dtype=np.int32)
    nuclei[5:9, 5:9] = 1
    nuclei[18:23, 18:23] = 2
    cells = np.zeros_like(nuclei)
    cells[2:13, 2:13] = 7  # ids unrelated to the nuclei
    cells[15:27, 15:27] = 3
    cells[21:25, 21:25] = 4  # a sliver of nucleus 2 falls in another cell; it still belongs to cell 3

    cytoplasm = cytoplasm_labels(nuclei, cells=cells)

    expected = np.zeros_like(nuclei)
    expected[(cells == 7) & (nuclei == 0)] = 1
    expected[(cells == 3) & (nuclei == 0)] = 2
    np.testing.assert_array_equal(cytoplasm, expected)

    table = measure_objects(nuclei, {"c": np.ones(nuclei.shape)}, cells=cells).set_index("label")
    assert table.loc[1, "cytoplasm_area"] == 11 * 11 - 16
    assert table.loc[2, "cytoplasm_area"] == ((cells == 3) & (nuclei == 0)).sum()


def test_a_cell_claimed_by_two_nuclei_goes_to_the_larger_overlap():
    nuclei = np.zeros((10, 20), dtype=np.int32)
    nuclei[2:6, 2:6] = 1
    nuclei[2:4, 10:12] = 2
    cells = np.zeros_like(nuclei)
    cells[1:8, 1:15] = 5

    cytoplasm = cytoplasm_labels(nuclei, cells=cells)
    assert set(np.unique(cytoplasm)) == {0, 1}
    table = measure_objects(nuclei, {"c": np.ones(nuclei.shape)}, cells=cells).set_index("label")
    assert np.isnan(table.loc[2, "c_ratio"])


def test_no_objects_give_an_empty_table_with_all_columns():
    table = measure_objects(np.zeros((8, 8), dtype=np.int32), {"nfkb": np.ones((8, 8))})
    assert len(table) == 0
    assert {"label", "cytoplasm_area", "nfkb_ratio"} <= set(table.columns)


def test_shape_mismatch_names_the_channel():
    with pytest.raises(ValueError, match="'nfkb'") as error:
        measure_objects(two_squares(), {"dna": np.zeros((40, 60)), "nfkb": np.zeros((40, 61))})
    assert "\n" not in str(error.value)


def test_channel_names_must_fit_the_channels():
    assert check_channel_names(["NFkB", "DNA"], 2) == ["NFkB", "DNA"]
    for names, fragment in [
        (["NFkB"], "1 name(s) given but the images have 2 channel(s)"),
        (["NFkB", "2nd"], "'2nd' must start with a letter"),
        (["dna", "DNA"], "must differ"),
        ("NFkB,DNA", "must be a list"),
    ]:
        with pytest.raises(ValueError, match="channel_names") as error:
            check_channel_names(names, 2)
        assert fragment in str(error.value)
    assert default_channel_names(["Channel1", "w2", "1"]) == ["Channel1", "w2", "ch1"]


@pytest.fixture
def segmented_directory(tmp_path):
    """Two fields of two channels named as on BBBC014, with label images beside them."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    nuclei = two_squares().astype(np.uint16)
    for field, scale in (("01-A-01", 1), ("13-B-01", 3)):
        tifffile.imwrite(images / f"Channel1-{field}.tif", (np.where(nuclei > 0, 40, 10) * scale).astype(np.uint8))
        tifffile.imwrite(images / f"Channel2-{field}.tif", (np.where(nuclei > 0, 90, 5)).astype(np.uint8))
        tifffile.imwrite(masks / f"{field}_cp_masks.tif", nuclei if field == "01-A-01" else np.zeros_like(nuclei))
    return group_fields(images), masks


def test_a_directory_is_measured_field_by_field_with_wells(segmented_directory):
    grouping, masks = segmented_directory
    seen = []
    table = measure_directory(grouping, masks, ["NFkB", "DNA"], ring_width=2, on_field=lambda f, n: seen.append((f, n)))
    assert seen == [("01-A-01", 2), ("13-B-01", 0)]
    assert table["field"].tolist() == ["01-A-01", "01-A-01"] and table["well"].tolist() == ["A01", "A01"]
    assert table["NFkB_nucleus_mean"].tolist() == [40.0, 40.0]
    assert table["NFkB_cytoplasm_mean"].tolist() == [10.0, 10.0]
    assert table["NFkB_ratio"].tolist() == [4.0, 4.0]
    assert table["DNA_ratio"].tolist() == [18.0, 18.0]
    assert table["area"].tolist() == [16, 36]


def test_a_missing_or_misshapen_mask_is_named(segmented_directory):
    grouping, masks = segmented_directory
    (masks / "13-B-01_cp_masks.tif").unlink()
    with pytest.raises(ValueError, match="13-B-01_cp_masks.tif: no mask for field 13-B-01"):
        measure_directory(grouping, masks, ["NFkB", "DNA"])
    tifffile.imwrite(masks / "13-B-01_cp_masks.tif", np.zeros((9, 9), np.uint16))
    with pytest.raises(ValueError, match=r"13-B-01_cp_masks.tif: mask shape \(9, 9\) differs"):
        measure_directory(grouping, masks, ["NFkB", "DNA"])
    with pytest.raises(ValueError, match="channel_names: 1 name"):
        measure_directory(grouping, masks, ["NFkB"])


def test_uint32_masks_are_measured(segmented_directory):
    grouping, masks = segmented_directory
    write_label_image(masks / "01-A-01_cp_masks.tif", two_squares() * 40000)  # labels 40000, 80000: uint32
    table = measure_directory(grouping, masks, ["NFkB", "DNA"], ring_width=2)
    assert table["label"].tolist() == [40000, 80000]
    assert table["area"].tolist() == [16, 36]


def test_masks_get_the_image_readers_checks(segmented_directory):
    grouping, masks = segmented_directory
    mask = masks / "13-B-01_cp_masks.tif"
    write_label_image(mask, np.ones((80, 80), np.uint16))  # over the limit; its field (40x60) is not
    with pytest.raises(ImageReadError) as raised:
        measure_directory(grouping, masks, ["NFkB", "DNA"], max_pixels=40 * 60)
    assert str(raised.value) == (
        f"{mask}: 80x80 = 6400 pixels per channel exceeds the limit of 2400 (MANTLE_MAX_FIELD_PIXELS); "
        "split the image into tiles"
    )
    write_label_image(mask, np.random.default_rng(0).integers(0, 60000, (40, 60)))  # random: zlib cannot shrink it
    mask.write_bytes(mask.read_bytes()[:2000])
    with pytest.raises(ImageReadError) as raised:
        measure_directory(grouping, masks, ["NFkB", "DNA"])
    assert str(raised.value).startswith(f"cannot read image {mask}: the file is truncated")
    assert "\n" not in str(raised.value)


def test_cytoplasm_and_cell_columns_from_cell_masks_have_known_means():
    nuclei = np.zeros((30, 40), dtype=np.int32)
    nuclei[5:9, 5:9] = 1  # 16 px in a 10x10 cell: cytoplasm 84 px
    nuclei[18:24, 20:26] = 2  # 36 px in a 12x12 cell: cytoplasm 108 px
    nuclei[26:28, 36:38] = 3  # in no cell
    cells = np.zeros_like(nuclei)
    cells[2:12, 2:12] = 70  # Cellpose's ids, unrelated to the nuclei
    cells[15:27, 17:29] = 80
    nfkb = np.full(nuclei.shape, 1.0)
    nfkb[cells == 70], nfkb[cells == 80] = 3.0, 2.0
    nfkb[nuclei == 1], nfkb[nuclei == 2], nfkb[nuclei == 3] = 12.0, 10.0, 7.0

    table = measure_objects(nuclei, {"NFkB": nfkb}, cells=cells, ring_width=1).set_index("label")

    assert table.attrs["cytoplasm"] == "cell"
    assert table["cytoplasm_area"].tolist() == [84, 108, 0]
    assert table["NFkB_cytoplasm_mean"].tolist()[:2] == [3.0, 2.0]
    assert table["NFkB_ratio"].tolist()[:2] == [4.0, 5.0]
    assert table["cell_area"].tolist() == [100, 144, 0]
    assert table["NFkB_cell_mean"].tolist()[:2] == pytest.approx([(12 * 16 + 3 * 84) / 100, (10 * 36 + 2 * 108) / 144])
    assert table["NFkB_cell_integrated"].tolist() == [12 * 16 + 3 * 84, 10 * 36 + 2 * 108, 0]
    assert table["cell_eccentricity"].tolist()[:2] == [0.0, 0.0]
    assert table["cell_solidity"].tolist()[:2] == [1.0, 1.0]
    assert table.loc[3, ["NFkB_cytoplasm_mean", "NFkB_ratio", "NFkB_cell_mean", "cell_solidity"]].isna().all()
    ring = measure_objects(nuclei, {"NFkB": nfkb}, ring_width=1)
    assert ring.attrs["cytoplasm"] == "ring" and "cell_area" not in ring.columns


def test_a_shared_cell_goes_to_the_nucleus_it_holds_most_of_whatever_its_label():
    nuclei = np.zeros((10, 20), dtype=np.int32)
    nuclei[2:4, 2:4] = 1  # 4 px
    nuclei[2:6, 10:14] = 2  # 16 px
    cells = np.zeros_like(nuclei)
    cells[1:8, 1:15] = 5

    table = measure_objects(nuclei, {"c": np.ones(nuclei.shape)}, cells=cells).set_index("label")

    assert table["cell_area"].tolist() == [0, 7 * 14]
    assert table["cytoplasm_area"].tolist() == [0, 7 * 14 - 20]
    assert np.isnan(table.loc[1, "c_ratio"])


def test_a_directory_with_cell_masks_measures_the_cells(segmented_directory, tmp_path):
    grouping, masks = segmented_directory
    cell_masks = tmp_path / "cells"
    cell_masks.mkdir()
    nuclei = two_squares()
    cells = ndimage.grey_dilation(nuclei, size=(5, 5)).astype(np.uint16) * 7
    write_label_image(cell_masks / "01-A-01_cp_masks.tif", cells)
    write_label_image(cell_masks / "13-B-01_cp_masks.tif", np.zeros_like(cells))

    table = measure_directory(grouping, masks, ["NFkB", "DNA"], cell_mask_directory=cell_masks)

    assert table.attrs["cytoplasm"] == "cell"
    assert table["cell_area"].tolist() == [8 * 8, 10 * 10]
    assert table["cytoplasm_area"].tolist() == [8 * 8 - 16, 10 * 10 - 36]
    assert table["NFkB_ratio"].tolist() == [4.0, 4.0]
    assert measure_directory(grouping, masks, ["NFkB", "DNA"]).attrs["cytoplasm"] == "ring"
    (cell_masks / "13-B-01_cp_masks.tif").unlink()
    with pytest.raises(ValueError, match=f"{cell_masks / '13-B-01_cp_masks.tif'}: no mask for field 13-B-01"):
        measure_directory(grouping, masks, ["NFkB", "DNA"], cell_mask_directory=cell_masks)
