import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage import measure
from skimage.filters import gaussian, threshold_otsu

from mantle_assets.imaging.cells import (
    cytoplasm_of_cells,
    foreground_threshold,
    labels_touching_border,
    match_nuclei_to_cells,
    propagate_cells,
)
from mantle_assets_tests.conftest import CROP, TWO_WELLS, bbbc014_images, missing_data


def disc(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    rows, columns = np.indices(shape)
    return (rows - center[0]) ** 2 + (columns - center[1]) ** 2 <= radius**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def noisy(image: np.ndarray, seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    return image + np.random.default_rng(seed).normal(0, sigma, image.shape)


def test_two_separate_cells_are_recovered_each_with_its_nucleus():
    shape = (80, 120)
    cells = [disc(shape, (40, 30), 20), disc(shape, (40, 90), 18)]
    nuclei = np.zeros(shape, np.int32)
    nuclei[disc(shape, (38, 28), 7)] = 4
    nuclei[disc(shape, (42, 92), 6)] = 9
    cytoplasm = np.full(shape, 5.0)
    for cell in cells:
        cytoplasm[cell] = 100.0
    cytoplasm[nuclei > 0] = 40.0  # the reporter kept out of the nucleus, as in unstimulated NF-kB cells

    result = propagate_cells(nuclei, noisy(cytoplasm))

    assert set(np.unique(result.cells)) == {0, 4, 9}
    for label, cell in zip((4, 9), cells, strict=True):
        assert not (ndimage.binary_erosion(cell) & (result.cells != label)).any()
        # The default smoothing (sigma 0.75) at a threshold near the background widens a sharp edge by about 1 px.
        assert iou(result.cells == label, cell) >= 0.9
    assert result.touching_border.size == 0
    assert 5.0 < result.threshold < 40.0


def touching_pair(valley_column: int) -> tuple[np.ndarray, np.ndarray]:
    """Two cells sharing one bright block, a dark 2-px line between them; nuclei centred on columns 25 and 75."""
    shape = (60, 100)
    cytoplasm = np.full(shape, 5.0)
    cytoplasm[10:50, 10:90] = 100.0
    cytoplasm[10:50, valley_column : valley_column + 2] = 40.0
    nuclei = np.zeros(shape, np.int32)
    nuclei[disc(shape, (30, 25), 5)] = 1
    nuclei[disc(shape, (30, 75), 5)] = 2
    cytoplasm[nuclei > 0] = 30.0
    return nuclei, noisy(cytoplasm, seed=1)


def split_columns(cells: np.ndarray) -> np.ndarray:
    """Per row of the block (away from its top and bottom edge), the first column of cell 2."""
    rows = cells[14:46]
    assert ((rows == 1) | (rows == 2))[:, 12:88].all()
    return np.argmax(rows == 2, axis=1)


def test_touching_cells_split_on_the_dark_line_not_half_way():
    # The line, between columns 55 and 56, lies 5.5 px off the half-way column 50.
    nuclei, cytoplasm = touching_pair(valley_column=55)

    first_of_cell_2 = split_columns(propagate_cells(nuclei, cytoplasm).cells)

    assert (np.abs(first_of_cell_2 - 56) <= 2).all(), first_of_cell_2


def test_strong_regularization_splits_by_distance_to_the_nuclei():
    nuclei, cytoplasm = touching_pair(valley_column=55)

    first_of_cell_2 = split_columns(propagate_cells(nuclei, cytoplasm, regularization=10).cells)

    assert (np.abs(first_of_cell_2 - 50.5) <= 1).all(), first_of_cell_2


def test_a_nucleus_on_dim_background_is_its_own_cell_even_below_the_threshold():
    shape = (60, 60)
    nuclei = np.zeros(shape, np.int32)
    nuclei[disc(shape, (20, 20), 8)] = 1
    nuclei[disc(shape, (45, 45), 4)] = 2
    cytoplasm = np.full(shape, 3.0)
    cytoplasm[disc(shape, (20, 20), 14)] = 80.0
    cytoplasm[nuclei == 2] = 1.0  # darker than the background itself

    cells = propagate_cells(nuclei, noisy(cytoplasm, sigma=0.5)).cells

    np.testing.assert_array_equal(cells == 2, nuclei == 2)
    assert (cells == 1).sum() > 2 * (nuclei == 1).sum()


def test_cells_on_the_edge_are_kept_and_flagged():
    shape = (50, 50)
    nuclei = np.zeros(shape, np.int32)
    nuclei[disc(shape, (25, 6), 4)] = 3
    nuclei[disc(shape, (25, 32), 4)] = 5
    cytoplasm = np.full(shape, 2.0)
    cytoplasm[disc(shape, (25, 4), 10)] = 60.0  # cut by the left edge
    cytoplasm[disc(shape, (25, 32), 10)] = 60.0

    result = propagate_cells(nuclei, noisy(cytoplasm, sigma=0.5))

    assert result.touching_border.tolist() == [3]
    assert (result.cells[:, 0] == 3).any()
    assert labels_touching_border(result.cells).tolist() == [3]


@pytest.mark.parametrize("seed", range(6))
def test_every_cell_holds_its_whole_nucleus_and_no_other(seed):
    rng = np.random.default_rng(seed)
    shape = (128, 128)
    nuclei = np.zeros(shape, np.int32)
    label = 0
    while label < 14:
        center, radius = rng.uniform(0, 128, 2), rng.uniform(3, 7)
        candidate = disc(shape, tuple(center), radius)
        if candidate.sum() > 10 and not ndimage.binary_dilation(nuclei > 0, iterations=2)[candidate].any():
            label += 1
            nuclei[candidate] = label * 3  # sparse labels
    cytoplasm = rng.normal(10, 3, shape)
    for _ in range(10):
        cytoplasm += rng.uniform(20, 120) * disc(shape, tuple(rng.uniform(0, 128, 2)), rng.uniform(8, 25))
    cytoplasm = ndimage.gaussian_filter(cytoplasm, 1.5)

    cells = propagate_cells(nuclei, cytoplasm, regularization=rng.uniform(0, 0.2)).cells

    assert set(np.unique(cells)) == set(np.unique(nuclei))  # one cell per nucleus, labelled as it
    np.testing.assert_array_equal(cells[nuclei > 0], nuclei[nuclei > 0])  # its whole nucleus, no other's
    for value in np.unique(nuclei[nuclei > 0]):
        assert ndimage.label(cells == value)[1] == 1


def test_no_nuclei_give_no_cells():
    cytoplasm = noisy(np.where(disc((40, 40), (20, 20), 12), 90.0, 4.0))
    result = propagate_cells(np.zeros((40, 40), np.uint16), cytoplasm)
    assert not result.cells.any() and result.cells.dtype == np.uint16
    assert result.touching_border.size == 0


def test_the_threshold_can_be_set_or_corrected():
    nuclei, cytoplasm = touching_pair(valley_column=55)
    automatic = propagate_cells(nuclei, cytoplasm)
    corrected = propagate_cells(nuclei, cytoplasm, threshold_correction=4)
    assert corrected.threshold == pytest.approx(4 * automatic.threshold)
    assert 0 < (corrected.cells > 0).sum() < (automatic.cells > 0).sum()

    above_everything = propagate_cells(nuclei, cytoplasm, threshold=1000)
    np.testing.assert_array_equal(above_everything.cells, nuclei)
    assert above_everything.threshold == 1000


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"threshold": 20, "threshold_correction": 2}, "threshold_correction applies to the automatic threshold"),
        ({"regularization": -1}, "regularization must be a finite number >= 0, got -1"),
        ({"smoothing": float("nan")}, "smoothing must be a finite number >= 0"),
        ({"threshold_correction": 0}, "threshold_correction must be a finite number > 0"),
        ({"nuclei": np.zeros((8, 8))}, "nuclei must hold labels (integers >= 0), got float64 values"),
        ({"nuclei": np.zeros((2, 8, 8), int)}, "nuclei must be a 2-D label image, not 3-D"),
        ({"cytoplasm": np.zeros((8, 9))}, "cytoplasm has shape (8, 9), nuclei have shape (8, 8)"),
    ],
)
def test_bad_parameters_are_named_in_one_line(arguments, fragment):
    images = {"nuclei": np.zeros((8, 8), np.int32), "cytoplasm": np.zeros((8, 8))}
    images |= {key: arguments.pop(key) for key in ("nuclei", "cytoplasm") if key in arguments}
    with pytest.raises(ValueError) as error:
        propagate_cells(images["nuclei"], images["cytoplasm"], **arguments)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_nuclei_are_matched_to_the_cell_holding_most_of_them():
    nuclei = np.zeros((20, 60), np.int32)
    cells = np.zeros_like(nuclei)
    cells[2:10, 2:10] = 10  # one nucleus
    nuclei[4:7, 4:7] = 1
    cells[2:18, 14:30] = 20  # two nuclei: 3 (16 px) first, then 2 (9 px)
    nuclei[3:6, 16:19] = 2
    nuclei[10:14, 20:24] = 3
    cells[2:10, 34:40] = 30  # none
    cells[2:10, 44:50] = 40  # nucleus 4 is 6 px here and 3 px in cell 50
    cells[2:10, 50:56] = 50
    nuclei[5:8, 48:51] = 4
    nuclei[15:18, 40:43] = 5  # in no cell

    matched = match_nuclei_to_cells(nuclei, cells)

    assert matched.cell_of_nucleus == {1: 10, 2: 20, 3: 20, 4: 40}
    assert matched.multinucleate == {20: (3, 2)}
    assert matched.anucleate == (30, 50)
    expected = np.zeros_like(cells)
    for cell, nucleus in ((10, 1), (20, 3), (40, 4)):
        expected[cells == cell] = nucleus
    np.testing.assert_array_equal(matched.cells, expected)
    assert matched.touching_border.size == 0


def test_matching_propagated_cells_changes_nothing():
    nuclei, cytoplasm = touching_pair(valley_column=55)
    cells = propagate_cells(nuclei, cytoplasm).cells
    matched = match_nuclei_to_cells(nuclei, cells)
    np.testing.assert_array_equal(matched.cells, cells)
    assert matched.cell_of_nucleus == {1: 1, 2: 2}
    assert matched.multinucleate == {} and matched.anucleate == ()


def test_cytoplasm_is_the_cell_minus_every_nucleus():
    nuclei = np.array([[0, 1, 0, 2, 0, 0]])
    cells = np.array([[1, 1, 1, 1, 1, 0]])  # holds nucleus 2's pixel too (a binucleate cell)
    assert cytoplasm_of_cells(cells, nuclei).tolist() == [[1, 0, 1, 0, 1, 0]]
    with pytest.raises(ValueError, match=r"cells have shape \(1, 5\), nuclei have shape \(1, 6\)"):
        cytoplasm_of_cells(cells[:, :5], nuclei)


def test_bbbc014_crop_cells_hold_one_nucleus_each_and_are_larger_than_it():
    """Cells of a 160x160 crop of an untreated (A01) and a treated (A12) BBBC014 well, nuclei by Otsu on the DNA.

    The platform thresholds whole fields, so the crop takes its field's threshold: a crop's own threshold is
    a different one (11.9 against the A01 field's 6.8, since a dense crop holds little background).
    """
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found (set MANTLE_DEMO_DATA)")
    larger = []
    for well in TWO_WELLS:
        dna = tifffile.imread(images / f"Channel2-{well}.tif")[CROP]
        nf_kb_field = tifffile.imread(images / f"Channel1-{well}.tif")
        field_threshold = foreground_threshold(gaussian(nf_kb_field.astype(float), sigma=0.75, preserve_range=True))
        nuclei = measure.label(dna > threshold_otsu(dna))
        cells = propagate_cells(nuclei, nf_kb_field[CROP], threshold=field_threshold).cells

        matched = match_nuclei_to_cells(nuclei, cells)
        ids = np.unique(nuclei[nuclei > 0])
        assert matched.multinucleate == {} and matched.anucleate == ()
        assert matched.cell_of_nucleus == {int(i): int(i) for i in ids}
        assert (cells[nuclei > 0] == nuclei[nuclei > 0]).all()
        cell_area = np.bincount(cells.ravel(), minlength=ids.max() + 1)[ids]
        nucleus_area = np.bincount(nuclei.ravel(), minlength=ids.max() + 1)[ids]
        larger.append(cell_area > nucleus_area)
    assert len(np.concatenate(larger)) >= 30
    assert np.concatenate(larger).mean() >= 0.95
