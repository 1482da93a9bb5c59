import numpy as np
import pytest

from mantle_assets.models.styles import (
    STYLE_FEATURES,
    cluster_styles,
    held_out_styles,
    split_annotated_by_style,
    split_by_style,
    style_features,
)


def discs(side, radius, centres, foreground=100.0, background=10.0):
    yy, xx = np.mgrid[:side, :side]
    image = np.full((side, side), background)
    mask = np.zeros((side, side), np.int32)
    for label, (y, x) in enumerate(centres, start=1):
        inside = (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
        image[inside], mask[inside] = foreground, label
    return image, mask


def test_style_features_of_flat_discs():
    image, mask = discs(64, 6, [(15, 15), (45, 45)])
    features = dict(zip(STYLE_FEATURES, style_features(image, mask), strict=True))
    area = (mask == 1).sum()
    assert features["log2_image_side"] == pytest.approx(6.0)
    assert features["foreground_intensity"] == pytest.approx(1.0)
    assert features["background_intensity"] == pytest.approx(0.1)
    assert features["nucleus_texture"] == pytest.approx(0.0)
    assert 2 ** features["log2_nucleus_diameter"] == pytest.approx(2 * np.sqrt(area / np.pi))
    assert features["foreground_fraction"] == pytest.approx(2 * area / 64**2)


def test_textured_nuclei_have_texture():
    image, mask = discs(64, 6, [(15, 15), (45, 45)])
    image[::2] *= np.where(mask[::2] > 0, 0.5, 1.0)
    assert style_features(image, mask)[STYLE_FEATURES.index("nucleus_texture")] > 0.2


@pytest.mark.parametrize("mask", [np.zeros((8, 8), np.int32), np.ones((8, 8), np.int32)])
def test_a_mask_without_objects_or_background_is_refused(mask):
    with pytest.raises(ValueError, match="objects and background"):
        style_features(np.ones((8, 8)), mask)


def test_styles_are_found_and_numbered_by_nucleus_diameter():
    rng = np.random.default_rng(1)
    big = rng.normal([9.0, 0.5, 0.1, 0.2, 5.5, 0.3], 0.05, (20, 6))
    small = rng.normal([8.0, 0.5, 0.1, 0.2, 3.5, 0.05], 0.05, (30, 6))
    clusters = cluster_styles(np.vstack([big, small]), 2, seed=3)
    assert clusters.labels.tolist() == [1] * 20 + [0] * 30
    assert clusters.centres[1, STYLE_FEATURES.index("log2_nucleus_diameter")] == pytest.approx(5.5, abs=0.05)
    assert clusters.describe(0).startswith("style 0: 30 images") and "nuclei ~11 px" in clusters.describe(0)
    again = cluster_styles(np.vstack([big, small]), 2, seed=3)
    assert np.array_equal(again.labels, clusters.labels)


def test_more_styles_than_images_are_refused():
    with pytest.raises(ValueError, match="n_styles must be 2 to 3"):
        cluster_styles(np.zeros((3, 6)), 4)


def test_held_out_styles_are_taken_from_both_ends_within_the_share():
    labels = np.repeat(np.arange(6), [177, 111, 52, 37, 78, 86])
    # Ends inwards: 0 (too many), 5 (86), 1 (too many with 5), 4 (too many), 2 (52), 3 (too many).
    assert held_out_styles(labels, 0.3) == [2, 5]
    assert held_out_styles(labels, 0.25) == [3, 5]
    with pytest.raises(ValueError, match="max_share=0.05"):
        held_out_styles(labels, 0.05)


def test_at_least_one_style_stays_for_training():
    assert held_out_styles(np.repeat(np.arange(3), [1, 1, 1]), 0.99) == [0, 2]


def test_the_split_holds_out_whole_styles():
    train, validation = split_by_style(np.array([0, 1, 2, 1, 0]), [1])
    assert train.tolist() == [0, 2, 4] and validation.tolist() == [1, 3]


def test_annotated_images_of_two_acquisitions_are_split_by_acquisition():
    small = [discs(64, 3, [(10, 10), (30, 30), (50, 50)]) for _ in range(4)]
    big = [discs(128, 15, [(30, 30), (90, 90)], foreground=200.0) for _ in range(3)]
    images, masks = zip(*(small + big), strict=True)
    split = split_annotated_by_style(list(images), list(masks), n_styles=2, max_share=0.5)
    assert split.clusters.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert split.held_out == [1]
    assert split.train.tolist() == [0, 1, 2, 3] and split.validation.tolist() == [4, 5, 6]
