import math

import numpy as np
import pytest
import tifffile

from mantle_assets.imaging.segmentation import (
    CellposeSegmenter,
    ParameterError,
    SegmentationSettings,
    check_channels,
    fill_holes_and_remove_small_masks,
    load_size_parameters,
    parse_diameter,
    resolve_channel,
    select_channels,
    with_smaller_batches_on_oom,
)
from mantle_assets.models.registry import resolve_model
from mantle_assets_tests.conftest import bbbc014_images, missing_data


@pytest.mark.parametrize("text", ["None", "none", " None ", ""])
def test_none_means_automatic_diameter(text):
    assert parse_diameter(text) is None


@pytest.mark.parametrize("text, value", [("12", 12.0), ("7.5", 7.5), (30, 30.0)])
def test_diameter_in_pixels(text, value):
    assert parse_diameter(text) == value


@pytest.mark.parametrize("text", ["-3", "0", "nan", "inf", "big", math.nan])
def test_bad_diameter_names_the_parameter(text):
    with pytest.raises(ParameterError, match="^diameter must be") as error:
        parse_diameter(text)
    assert "\n" not in str(error.value)


def test_channel_beyond_the_images_is_refused():
    with pytest.raises(ParameterError, match="nuclei_channel=3 but the images have 2 channel"):
        check_channels(3, 3, n_channels=2)


def test_channels_beyond_three_are_allowed_up_to_the_images_channels():
    check_channels(5, 5, n_channels=5)
    check_channels(0, 12)  # no image to compare with: any channel number
    check_channels(np.int64(4), 0, n_channels=5)  # numpy integers, as read from arrays, are numbers too
    with pytest.raises(ParameterError, match=r"^cytoplasm_channel=6 but the images have 5 channel\(s\)$"):
        check_channels(5, 6, n_channels=5)


@pytest.mark.parametrize(
    "nuclei, cytoplasm, name, shown",
    [(-1, 0, "nuclei_channel", "-1"), (0, 1.5, "cytoplasm_channel", "1.5"), (True, 1, "nuclei_channel", "True"),
     (1, "2", "cytoplasm_channel", "'2'"), (2.0, 2, "nuclei_channel", "2.0")],
)
def test_a_channel_that_is_not_a_whole_number_from_zero_is_refused(nuclei, cytoplasm, name, shown):
    with pytest.raises(ParameterError) as error:
        check_channels(nuclei, cytoplasm, n_channels=3)
    assert str(error.value) == (
        f"{name} must be a channel number (0, or c >= 1 for the c-th channel of a field), got {shown}")


CELL_PAINTING = ["DNA", "ER", "RNA", "AGP", "Mito"]
LABELS = ["w1", "w2", "w3", "w4", "w5"]


@pytest.mark.parametrize(
    "value, expected",
    [(3, 3), (0, 0), ("5", 5), (" 2 ", 2), ("0", 0),
     ("Mito", 5), ("mito", 5), ("DNA", 1), ("w4", 4), ("W2", 2)],
)
def test_a_channel_is_given_by_number_or_by_name(value, expected):
    assert resolve_channel(value, CELL_PAINTING, LABELS, "nuclei_channel") == expected


def test_numbers_given_as_text_are_checked_like_numbers():
    # "-1" is a number, not a name: check_channels refuses it with its own message.
    assert resolve_channel("-1", CELL_PAINTING, LABELS) == -1


def test_the_users_channel_names_win_over_file_name_labels():
    # A name given at registration means what the user said, even where it is also another channel's label.
    assert resolve_channel("w1", ["w2", "w1"], ["w1", "w2"]) == 2
    assert resolve_channel("Channel2", None, ["Channel1", "Channel2"]) == 2


def test_an_unknown_name_is_refused_listing_the_channels():
    with pytest.raises(ParameterError) as error:
        resolve_channel("DAPI", CELL_PAINTING, LABELS, "nuclei_channel")
    assert str(error.value) == (
        "nuclei_channel='DAPI' names no channel; the channels are "
        "1 DNA (w1), 2 ER (w2), 3 RNA (w3), 4 AGP (w4), 5 Mito (w5)")


def test_an_unknown_name_of_a_directory_without_channel_names_lists_the_numbers():
    with pytest.raises(ParameterError, match=r"^cytoplasm_channel='DNA' names no channel; the channels are 1, 2, 3$"):
        resolve_channel("DNA", None, ["1", "2", "3"], "cytoplasm_channel")


def test_a_name_of_two_channels_is_refused():
    with pytest.raises(ParameterError) as error:
        resolve_channel("dapi", None, ["DAPI", "FITC", "dapi"], "nuclei_channel")
    assert str(error.value) == (
        "nuclei_channel='dapi' is ambiguous: it names channels 1 and 3; the channels are 1 DAPI, 2 FITC, 3 dapi")


def test_select_channels_follows_mantle_meanings():
    stack = np.stack([np.full((3, 4), 10.0), np.full((3, 4), 20.0), np.full((3, 4), 60.0)])
    assert np.all(select_channels(stack, 0, 0) == 30.0)  # grayscale: mean of channels
    assert np.all(select_channels(stack, 3, 3) == 60.0)  # nuclei-only of blue
    assert np.all(select_channels(stack, 0, 2) == 20.0)  # green without nuclei
    pair = select_channels(stack, 3, 1)  # red cytoplasm, blue nuclei
    assert pair.shape == (2, 3, 4)
    assert np.all(pair[0] == 10.0) and np.all(pair[1] == 60.0)


def test_select_channels_takes_the_c_th_of_five_channels():
    stack = np.stack([np.full((3, 4), 10.0 * c) for c in range(1, 6)])
    assert np.all(select_channels(stack, 5, 5) == 50.0)
    pair = select_channels(stack, 1, 4)  # AGP to segment, DNA as nuclei
    assert np.all(pair[0] == 40.0) and np.all(pair[1] == 10.0)
    with pytest.raises(ParameterError, match="nuclei_channel=6 but the images have 5 channel"):
        select_channels(stack, 6, 6)


def gpu_holding(max_batch: int):
    """Evaluation on a GPU that fits at most ``max_batch`` tiles; records the sizes tried."""
    import torch

    tried = []

    def run(batch_size):
        tried.append(batch_size)
        if batch_size > max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch_size

    return run, tried


def test_out_of_memory_retries_with_halved_batches():
    run, tried = gpu_holding(max_batch=2)
    assert with_smaller_batches_on_oom(run, 8) == 2
    assert tried == [8, 4, 2]


def test_out_of_memory_at_batch_one_is_raised():
    import torch

    run, tried = gpu_holding(max_batch=0)
    with pytest.raises(torch.OutOfMemoryError):
        with_smaller_batches_on_oom(run, 4)
    assert tried == [4, 2, 1]


def test_size_model_is_read_without_unpickling_code(bundled_model_name):
    size_file = f"{resolve_model(bundled_model_name).path}_size.npy"
    expected = np.load(size_file, allow_pickle=True).item()
    params = load_size_parameters(size_file)
    assert set(params) == set(expected)
    assert all(np.array_equal(params[key], expected[key]) for key in expected)


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran on load",))


def test_doctored_size_model_is_refused(tmp_path, capsys):
    doctored = tmp_path / "model_size.npy"
    np.save(doctored, np.array({"A": RunsCode(), "smean": 0, "ymean": 0, "diam_mean": 17.0}), allow_pickle=True)
    with pytest.raises(ValueError, match=r"model_size.npy: not a Cellpose size model \(refusing to load builtins"):
        load_size_parameters(doctored)
    assert "this ran on load" not in capsys.readouterr().out


def test_plain_array_is_not_a_size_model(tmp_path):
    array = tmp_path / "array_size.npy"
    np.save(array, np.zeros(3))
    with pytest.raises(ValueError, match="array_size.npy: not a Cellpose size model"):
        load_size_parameters(array)


def nuclei_with_a_gap() -> np.ndarray:
    """Four 10x10 nuclei, the second with a hole, and a 3x3 fragment; label 2 is missing, as after a flow rejection."""
    masks = np.zeros((40, 40), np.uint16)
    masks[2:12, 2:12] = 1
    masks[2:12, 20:30] = 3
    masks[6, 25] = 0
    masks[20:23, 20:23] = 4
    masks[30:40, 2:12] = 5
    masks[30:40, 28:38] = 6
    return masks


def pixels_of(masks: np.ndarray) -> set[frozenset]:
    """Each mask as the set of its pixels' flat indices, whatever its label."""
    flat = masks.ravel()
    return {frozenset(np.flatnonzero(flat == label).tolist()) for label in np.unique(flat[flat > 0])}


def test_small_masks_are_removed_by_their_own_size_when_labels_have_gaps():
    from cellpose.utils import fill_holes_and_remove_small_masks as cellpose_filter

    masks = nuclei_with_a_gap()
    expected = {
        frozenset(np.flatnonzero(masks.ravel() == label).tolist()) | ({6 * 40 + 25} if label == 3 else set())
        for label in (1, 3, 5, 6)
    }
    # Cellpose 3.1.1.3 removes nucleus 3 (the second label present) for the fragment's size: the bug.
    assert len(pixels_of(cellpose_filter(masks.copy(), min_size=15))) == 3
    filtered = fill_holes_and_remove_small_masks(masks, min_size=15)
    assert pixels_of(filtered) == expected
    assert sorted(np.unique(filtered).tolist()) == [0, 1, 2, 3, 4] and filtered.dtype == masks.dtype
    assert np.array_equal(masks, nuclei_with_a_gap())


def test_without_gaps_the_filter_gives_cellposes_masks_and_labels():
    from cellpose.utils import fill_holes_and_remove_small_masks as cellpose_filter
    from scipy import ndimage

    # Near the percolation threshold: labels 1..N, hundreds of fragments under 15 pixels, large masks full of holes,
    # some holding others.
    masks = ndimage.label(np.random.default_rng(0).random((128, 128)) < 0.6)[0].astype(np.uint16)
    sizes = np.bincount(masks.ravel())[1:]
    assert (sizes < 15).sum() > 100 and (sizes >= 15).sum() > 20
    assert np.array_equal(fill_holes_and_remove_small_masks(masks, 15), cellpose_filter(masks.copy(), min_size=15))


def test_min_size_zero_keeps_every_mask():
    masks = nuclei_with_a_gap()
    assert len(pixels_of(fill_holes_and_remove_small_masks(masks, 0))) == 5


def bbbc014_dna(well: str, rows: slice, columns: slice) -> np.ndarray:
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found")
    return tifffile.imread(images / f"Channel2-{well}.tif")[rows, columns].astype(np.float32)


def test_segmentation_removes_the_small_mask_cellpose_removes_on_a_crop_without_the_label_gap(bundled_model_name):
    field = bbbc014_dna("01-A-01", slice(512, 640), slice(256, 512))
    segmenter = CellposeSegmenter(resolve_model(bundled_model_name).path, gpu=False)
    settings = SegmentationSettings(diameter=13.0)
    options = dict(channels=[0, 0], diameter=13.0, flow_threshold=settings.flow_threshold,
                   cellprob_threshold=settings.cellprob_threshold)
    unfiltered = segmenter.model.eval(field, min_size=-1, **options)[0]
    assert (np.bincount(unfiltered.ravel())[1:] < settings.min_size).sum() == 1, "the crop must have a small mask"
    masks = segmenter.segment(field, settings).masks
    assert masks.max() == unfiltered.max() - 1 and np.bincount(masks.ravel())[1:].min() >= settings.min_size
    assert np.array_equal(masks, segmenter.model.eval(field, min_size=settings.min_size, **options)[0])

