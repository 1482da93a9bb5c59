import re

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from mantle_assets.cli import main, root_cause
from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.imaging.segmentation import SegmentationResult
from mantle_assets.models.bundling import bundle_model
from mantle_assets.models.styles import StyleClusters, StyleSplit, split_by_style
from mantle_assets.models.training import (
    ALL_HELD_OUT,
    AnnotatedSet,
    Augmentation,
    TrainingParameters,
    augment_intensity,
    average_precision,
    check_model_name,
    evaluate_styles,
    find_annotated_pairs,
    initial_weights,
    load_annotated_set,
    object_weights,
    parse_named_path,
    sampling_probabilities,
    scale_diameter,
    sets_by_style,
    small_object_recall,
    train_augmented,
    weighted_segmentation_loss,
)
from mantle_assets.settings import OutsideDataRootsError


def squares(offset=0):
    labels = np.zeros((64, 64), np.int32)
    for index, (y, x) in enumerate([(5, 5), (5, 40), (40, 5), (40, 40)], start=1):
        labels[y + offset : y + offset + 15, x : x + 15] = index
    return labels


def test_images_and_masks_folders_are_paired(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / "images" / f"{name}.tif", np.zeros((4, 4), np.uint8))
        tifffile.imwrite(tmp_path / "masks" / f"{name}.tif", np.zeros((4, 4), np.uint16))
    tifffile.imwrite(tmp_path / "images" / "unlabelled.tif", np.zeros((4, 4), np.uint8))
    pairs = find_annotated_pairs(tmp_path)
    assert [(i.name, m.parent.name) for i, m in pairs] == [("a.tif", "masks"), ("b.tif", "masks")]


def test_cellpose_masks_naming_is_paired(tmp_path):
    tifffile.imwrite(tmp_path / "cells.tif", np.ones((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "cells_masks.tif", squares()[:8, :8].astype(np.uint16))
    annotated = load_annotated_set(tmp_path)
    assert annotated.names == ["cells"]
    assert annotated.images[0].dtype == np.float32


def annotated_pair(directory, image, mask):
    for folder in ("images", "masks"):
        (directory / folder).mkdir(exist_ok=True)
    tifffile.imwrite(directory / "images" / "a.tif", image)
    tifffile.imwrite(directory / "masks" / "a.tif", mask)
    return directory / "images" / "a.tif", directory / "masks" / "a.tif"


def test_grey_images_and_uint32_masks_are_read_as_y_x(tmp_path):
    rgb = np.stack([np.full((64, 64), c, np.uint8) for c in (7, 8, 9)], axis=-1)
    annotated_pair(tmp_path, rgb, squares().astype(np.uint32) * 70000)
    annotated = load_annotated_set(tmp_path)
    assert annotated.images[0].shape == (64, 64) and annotated.images[0].dtype == np.float32
    assert (annotated.images[0] == 7).all()  # the first channel
    assert annotated.masks[0].dtype == np.int32
    np.testing.assert_array_equal(annotated.masks[0], squares() * 70000)


def test_training_images_and_masks_get_the_image_readers_checks(tmp_path):
    image, mask = annotated_pair(tmp_path, np.zeros((64, 64), np.uint16), squares().astype(np.uint16))
    image_name, mask_name = re.escape(str(image)), re.escape(str(mask))
    with pytest.raises(ValueError, match=rf"^{image_name}: 64x64 = 4096 pixels per channel exceeds the limit of 4095"):
        load_annotated_set(tmp_path, max_pixels=4095)
    tifffile.imwrite(mask, squares().astype(np.float32))
    refused_type = rf"^{mask_name}: unsupported pixel type float32; expected uint8, uint16 or uint32$"
    with pytest.raises(ValueError, match=refused_type):
        load_annotated_set(tmp_path)
    tifffile.imwrite(mask, np.random.default_rng(0).integers(0, 60000, (64, 64)).astype(np.uint16))
    mask.write_bytes(mask.read_bytes()[:4000])
    with pytest.raises(ValueError, match=rf"^cannot read image {mask_name}: the file is truncated") as raised:
        load_annotated_set(tmp_path)
    assert "\n" not in str(raised.value)
    tifffile.imwrite(image, np.zeros((20, 64, 64), np.uint16))
    with pytest.raises(ValueError, match=rf"^{image_name}: shape \(20, 64, 64\) looks like a 3-D stack"):
        load_annotated_set(tmp_path)


def test_directory_without_annotations_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "cells.tif", np.ones((4, 4), np.uint8))
    with pytest.raises(ValueError, match="no annotated images in"):
        find_annotated_pairs(tmp_path)


def test_set_weights_give_each_set_its_share():
    p = sampling_probabilities({"small": 10, "large": 90, "other": 100}, {"small": 0.5})
    assert p.sum() == pytest.approx(1.0)
    assert p[:10].sum() == pytest.approx(0.5)
    assert p[10:100].sum() == pytest.approx(0.5 * 90 / 190)
    with pytest.raises(ValueError, match="sum to"):
        sampling_probabilities({"a": 1, "b": 1}, {"a": 0.7, "b": 0.6})


def test_named_paths():
    assert parse_named_path("train=/data/x") == ("train", __import__("pathlib").Path("/data/x"))
    assert parse_named_path("/data/bbbc039_val")[0] == "bbbc039_val"


def test_average_precision_of_known_predictions():
    truth = squares()
    assert average_precision([truth], [truth]) == {"ap50": 1.0, "ap75": 1.0, "ap90": 1.0}
    shifted = squares(offset=3)  # IoU of each pair = 12*15 / (18*15) = 0.667
    scores = average_precision([truth], [shifted])
    assert scores["ap50"] == 1.0 and scores["ap75"] == 0.0
    half = truth.copy()
    half[half > 2] = 0  # two of four objects found: TP=2, FN=2 -> AP = 0.5
    assert average_precision([truth], [half])["ap50"] == pytest.approx(0.5)


def test_small_object_recall_counts_only_small_objects_found():
    truth = np.zeros((40, 40), np.uint16)
    truth[2:22, 2:22] = 1  # 400 px: not small
    truth[30:35, 30:35] = 2  # 25 px: small, found exactly below
    truth[30:36, 2:8] = 3  # 36 px: small, found only in part below
    truth[25:28, 25:28] = 4  # 9 px: small, missed
    predicted = np.zeros_like(truth)
    predicted[30:35, 30:35] = 7
    predicted[30:36, 2:4] = 8  # IoU 12/36 < 0.5
    assert small_object_recall([truth], [predicted]) == (pytest.approx(1 / 3), 3)
    assert small_object_recall([truth], [predicted], max_area=30) == (pytest.approx(1 / 2), 2)
    assert small_object_recall([truth], [np.zeros_like(truth)])[0] == 0.0
    assert small_object_recall([truth], [predicted], max_area=5) == (None, 0)


def test_training_starts_fresh_without_an_initial_model():
    assert initial_weights(TrainingParameters()) is False


def test_training_continues_from_a_bundled_model(bundled_model_name):
    from mantle_assets.models.registry import resolve_model

    spec = resolve_model(bundled_model_name)
    params = TrainingParameters(initial_model=bundled_model_name, diam_mean=spec.diam_mean)
    assert initial_weights(params) == str(spec.path)


def test_initial_model_at_another_scale_is_refused(bundled_model_name):
    with pytest.raises(ValueError, match="diam_mean=30 but initial_model"):
        initial_weights(TrainingParameters(initial_model=bundled_model_name, diam_mean=30.0))


BAD_MODEL_NAMES = ["/tmp/x/a/b", "a/b", "..", "../escape", ".hidden", "-rf", "", "na me", "a" * 101, "a\\b"]


@pytest.mark.parametrize("name", ["mantle-nuclei", "lab_v1.2", "A" * 100])
def test_a_simple_model_name_is_accepted(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", BAD_MODEL_NAMES)
def test_a_model_name_that_is_no_simple_name_is_refused(name):
    with pytest.raises(ValueError) as error:
        check_model_name(name)
    message = str(error.value)
    assert message.startswith("model_name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or "
                              "digit, got ")
    assert message.endswith(f"got {name!r}")


def annotated_set(directory):
    directory.mkdir(parents=True)
    annotated_pair(directory, np.zeros((64, 64), np.uint8), squares().astype(np.uint16))
    return directory


def test_annotated_directories_outside_the_data_roots_are_refused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    inside, outside = annotated_set(data / "inside"), annotated_set(tmp_path / "outside")
    monkeypatch.setenv("MANTLE_DATA_ROOTS", str(data))
    assert load_annotated_set(inside).names == ["a"]
    for given in (outside, data / ".." / "outside"):
        with pytest.raises(OutsideDataRootsError) as error:
            load_annotated_set(given)
        assert str(error.value) == (
            f"annotated directory {outside} is outside the data roots (MANTLE_DATA_ROOTS={data})")
    # A file linked out of the roots, in a directory inside them.
    (inside / "masks" / "a.tif").unlink()
    (inside / "masks" / "a.tif").symlink_to(outside / "masks" / "a.tif")
    with pytest.raises(OutsideDataRootsError, match=rf"^annotated mask {re.escape(str(outside))}/masks/a.tif is "):
        load_annotated_set(inside)


def run_training(instance, **config):
    return defs.resolve_job_def("training_job").execute_in_process(
        run_config={"ops": {"trained_cellpose_model": {"config": config}}}, instance=instance, raise_on_error=False
    )


def test_the_training_asset_refuses_a_model_name_that_is_a_path(tmp_path, instance, mantle_home):
    train = annotated_set(tmp_path / "train")
    target = tmp_path / "x" / "a" / "b"
    result = run_training(instance, train_directories=[f"t={train}"], validation_directory=str(train),
                          model_name=str(target))
    assert not result.success
    assert root_cause(result.failure_data_for_node("trained_cellpose_model")) == (
        f"model_name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit, got "
        f"'{target}'")
    assert not (tmp_path / "x").exists() and not (mantle_home / "models").exists()


def test_the_training_asset_refuses_directories_outside_the_data_roots(tmp_path, instance, monkeypatch):
    data = tmp_path / "data"
    inside, outside = annotated_set(data / "train"), annotated_set(tmp_path / "elsewhere")
    monkeypatch.setenv("MANTLE_DATA_ROOTS", str(data))
    result = run_training(instance, train_directories=[f"t={inside}"], validation_directory=str(outside))
    assert root_cause(result.failure_data_for_node("trained_cellpose_model")) == (
        f"annotated directory {outside} is outside the data roots (MANTLE_DATA_ROOTS={data})")
    assert EntityStore().list() == []


@pytest.mark.parametrize("name", ["/tmp/x/a/b", "../escape"])
def test_mantle_train_refuses_a_model_name_that_is_a_path_before_any_run(tmp_path, mantle_home, name):
    train = annotated_set(tmp_path / "train")
    result = CliRunner().invoke(main, ["train", "--train", f"t={train}", "--val", str(train), "--name", name])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: --name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit, "
        f"got '{name}'\n")
    assert not (mantle_home / "dagster" / "history").exists()  # no run was recorded


def test_a_bundle_name_that_is_a_path_is_refused(tmp_path, bundled_model_name):
    from mantle_assets.models.registry import resolve_model

    with pytest.raises(ValueError, match=r"^name must be 1-100 letters"):
        bundle_model(resolve_model(bundled_model_name).path, "../../escape", {"diam_mean": 17.0},
                     bundled_dir=tmp_path / "bundled")
    assert not (tmp_path / "bundled").exists() and not (tmp_path / "escape").exists()


def test_balanced_sets_share_the_rest_equally_whatever_their_size():
    p = sampling_probabilities({"bbbc": 10, "style0": 90, "style1": 30}, {"bbbc": 0.4}, balanced=True)
    assert p[:10].sum() == pytest.approx(0.4)
    assert p[10:100].sum() == pytest.approx(0.3) and p[100:].sum() == pytest.approx(0.3)


def normalised_crop():
    rng = np.random.default_rng(0)
    crop = np.zeros((2, 64, 64), np.float32)
    crop[0] = rng.uniform(0.0, 1.0, (64, 64))
    crop[0, 20:40, 20:40] += 2.0
    return crop


def test_without_augmentation_a_crop_is_normalised_as_cellpose_normalises():
    from cellpose.transforms import normalize99

    crop = normalised_crop()
    out = augment_intensity(crop, np.random.default_rng(0), Augmentation(probability=0.0))
    np.testing.assert_allclose(out[0], normalize99(crop[0]), atol=1e-5)
    np.testing.assert_array_equal(out[1], crop[1])


def test_augmentation_is_a_function_of_the_generator_state():
    crop, augmentation = normalised_crop(), Augmentation(probability=1.0)
    first = augment_intensity(crop, np.random.default_rng(5), augmentation)
    np.testing.assert_array_equal(first, augment_intensity(crop, np.random.default_rng(5), augmentation))
    assert not np.allclose(first, augment_intensity(crop, np.random.default_rng(6), augmentation))
    low, high = np.percentile(first[0], [1, 99])
    assert low == pytest.approx(0.0, abs=1e-5) and high == pytest.approx(1.0, abs=1e-5)


def test_without_renormalisation_a_crop_keeps_the_whole_images_normalisation():
    crop = normalised_crop()
    crop[0, :4] = -0.2  # whole-image normalisation leaves a crop's darkest pixels below 0
    kept = Augmentation(probability=0.0, renormalise=False)
    np.testing.assert_array_equal(augment_intensity(crop, np.random.default_rng(0), kept), crop)

    offset_only = Augmentation(probability=1.0, max_gamma=1.0, max_blur_sigma=0.0, max_noise=0.0, renormalise=False)
    shifted = augment_intensity(crop, np.random.default_rng(3), offset_only)
    assert (shifted[0] - crop[0]).min() > 0.0  # the background offset stays, nothing maps it back to 0
    assert np.percentile(shifted[0], 1) > 0.01
    np.testing.assert_array_equal(shifted[1], crop[1])


def test_noise_and_blur_change_what_normalisation_cannot_undo():
    crop = np.zeros((2, 64, 64), np.float32)
    crop[0, 16:48, 16:48] = 1.0
    crop[0, 16:48:2, 16:48:2] = 0.5  # a fine texture inside a flat-edged square
    only = {"probability": 1.0, "max_gamma": 1.0, "max_background": 0.0}
    noisy = augment_intensity(crop, np.random.default_rng(1), Augmentation(**only, max_blur_sigma=0.0, max_noise=1.0))
    blurred = augment_intensity(crop, np.random.default_rng(1), Augmentation(**only, max_blur_sigma=3.0, max_noise=0.0))
    plain = augment_intensity(crop, np.random.default_rng(1), Augmentation(probability=0.0))

    def roughness(image, region):
        return np.abs(np.diff(image[0][region], axis=1)).mean()

    background, texture = np.s_[:12, :], np.s_[20:44, 20:44]
    assert roughness(plain, background) == 0.0 and roughness(noisy, background) > 0.01
    assert roughness(blurred, texture) < 0.5 * roughness(plain, texture)


def test_augmented_training_checkpoints_resumes_and_writes_a_cellpose_model(tmp_path):
    from cellpose import models

    images, masks = [], []
    for offset in (0, 2, 4):
        labels = squares(offset)
        masks.append(labels)
        images.append(np.where(labels > 0, 200.0, 20.0).astype(np.float32))
    train_sets = {"a": AnnotatedSet(["0", "1"], images[:2], masks[:2]), "b": AnnotatedSet(["2"], images[2:], masks[2:])}
    params = TrainingParameters(batch_size=2, crop_size=64, min_train_masks=1, precision="float32")
    lines = []
    first = train_augmented(train_sets, tmp_path, "tiny", params, n_steps=2, warmup_steps=1, log=lines.append)
    assert first.steps == 2 and len(first.losses) == 2 and (tmp_path / "checkpoint.pt").is_file()
    resumed = train_augmented(train_sets, tmp_path, "tiny", params, n_steps=3, warmup_steps=1, log=lines.append)
    assert "resumed at step 2 of 3" in lines
    assert resumed.steps == 3 and resumed.losses[:2] == first.losses
    model = models.CellposeModel(pretrained_model=str(resumed.model_path))
    assert model.net.diam_labels.item() == pytest.approx(resumed.diam_labels)
    masks_out = model.eval(images[0], channels=[0, 0], diameter=17.0)[0]
    assert masks_out.shape == images[0].shape


def discs(radius, centres, shape=(128, 128), first_label=1):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for label, (y, x) in enumerate(centres, start=first_label):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = label
    return labels


def test_scale_diameter_is_cellposes_and_leaves_out_small_objects_when_asked():
    from cellpose.utils import diameters

    nuclei = discs(10, [(20, 20), (20, 60), (60, 20)])
    micronuclei = discs(2, [(100, 100), (100, 110), (110, 100), (110, 110), (120, 120)], first_label=4)
    mask = nuclei + micronuclei
    assert scale_diameter(mask) == pytest.approx(max(diameters(mask)[0], 5.0))
    # Five micronuclei outnumber three nuclei, so Cellpose's median is a micronucleus's; a disc of radius 10 is ~20 px.
    assert scale_diameter(mask) < 6
    assert scale_diameter(mask, min_area=60) == pytest.approx(20, abs=0.5)
    assert scale_diameter(mask, min_area=60) == pytest.approx(scale_diameter(nuclei))
    assert scale_diameter(np.zeros((8, 8), np.int32)) == 5.0


def test_augmented_training_rescales_by_the_diameter_of_objects_above_the_minimum_area(tmp_path):
    import torch

    nuclei = discs(10, [(20, 20), (20, 60), (60, 20), (60, 60)])
    micronuclei = discs(2, [(100, 100), (100, 110), (110, 100), (110, 110), (120, 120)], first_label=5)
    mask = nuclei + micronuclei
    image = np.where(mask > 0, 200.0, 20.0).astype(np.float32)
    few = discs(10, [(20, 20)])
    train_sets = {"a": AnnotatedSet(["0", "few"], [image, np.where(few > 0, 200.0, 20.0)], [mask, few])}
    diameters = {}
    for min_area in (0, 60):
        params = TrainingParameters(batch_size=1, crop_size=64, min_train_masks=2, precision="float32",
                                    diameter_min_area=min_area)
        lines = []
        train_augmented(train_sets, tmp_path / str(min_area), "tiny", params, n_steps=1, warmup_steps=1,
                        log=lines.append)
        assert "1 images with fewer than 2 objects left out" in lines
        diameters[min_area] = torch.load(tmp_path / str(min_area) / "prepared.pt", weights_only=False)["diams"]
    assert len(diameters[0]) == len(diameters[60]) == 1
    assert diameters[0][0] == pytest.approx(scale_diameter(mask)) and diameters[0][0] < 6
    assert diameters[60][0] == pytest.approx(20, abs=0.5)


def test_object_weights_lift_objects_under_the_median_area_up_to_the_maximum():
    nuclei = discs(10, [(20, 20), (20, 60), (60, 20)])
    micronuclei = discs(2, [(100, 100)], first_label=4)
    tiny = np.zeros_like(nuclei)
    tiny[120, 120] = 5
    mask = nuclei + micronuclei + tiny
    areas = np.bincount(mask.ravel())
    median = np.median(areas[1:])
    weights = object_weights(mask, 50.0)
    assert weights.dtype == np.float32 and weights.shape == mask.shape
    assert np.all(weights[mask == 0] == 1.0) and np.all(weights[nuclei > 0] == 1.0)
    assert weights[100, 100] == pytest.approx(median / areas[4])
    assert weights[120, 120] == 50.0  # median / 1 pixel, clipped
    assert np.all(object_weights(mask, 1.0) == 1.0)
    with pytest.raises(ValueError, match="object_weight_max"):
        object_weights(mask, 0.5)


def test_weighted_segmentation_loss_with_equal_weights_is_cellposes_and_scales_an_objects_errors():
    import torch
    from cellpose import train

    rng = np.random.default_rng(0)
    labels = np.stack([(rng.random((2, 32, 32)) > 0.5).astype(np.float32),
                       *rng.normal(size=(2, 2, 32, 32)).astype(np.float32).transpose(1, 0, 2, 3)], axis=1)
    output = torch.from_numpy(rng.normal(size=(2, 3, 32, 32)).astype(np.float32))
    ones = torch.ones(2, 32, 32)
    expected = train._loss_fn_seg(labels, output, torch.device("cpu"))
    assert weighted_segmentation_loss(torch.from_numpy(labels), output, ones).item() == pytest.approx(expected.item())
    assert weighted_segmentation_loss(torch.from_numpy(labels), output, 3 * ones).item() == pytest.approx(
        expected.item())
    # A flow error on one object only: weighting the object by w multiplies the loss by w / mean weight.
    exact = np.zeros((1, 3, 32, 32), np.float32)
    predicted = torch.full((1, 3, 32, 32), -20.0)
    predicted[:, :2] = 0.0
    predicted[0, 0, 4:8, 4:8] = 1.0
    weights = torch.ones(1, 32, 32)
    weights[0, 4:8, 4:8] = 9.0
    plain = weighted_segmentation_loss(torch.from_numpy(exact), predicted, torch.ones(1, 32, 32)).item()
    weighted = weighted_segmentation_loss(torch.from_numpy(exact), predicted, weights).item()
    cell_term = torch.nn.functional.softplus(torch.tensor(-20.0)).item()
    assert (weighted - cell_term) / (plain - cell_term) == pytest.approx(9.0 / weights.mean().item(), rel=1e-4)


def test_object_weights_travel_with_their_objects_through_cellposes_warp():
    import torch
    from cellpose import dynamics, transforms

    mask = discs(10, [(30, 30), (30, 90), (90, 30)]) + discs(3, [(90, 90)], first_label=4)
    flows = dynamics.labels_to_flows([mask], device=torch.device("cpu"))[0][1:].astype(np.float32)
    target = np.concatenate([object_weights(mask, 20.0)[None], flows])
    np.random.seed(3)
    _, warped, _ = transforms.random_rotate_and_resize([np.zeros((2, 128, 128), np.float32)], Y=[target],
                                                      scale_range=0.5, xy=(96, 96))
    lifted = warped[0, 0] > 1.0
    assert lifted.any()
    # The lifted weights lie on the micronucleus: inside the warped cell probability, in one blob of its size.
    assert np.mean(warped[0, 1][lifted] > 0.5) > 0.9
    assert lifted.sum() == pytest.approx((mask == 4).sum(), rel=0.6)


def test_augmented_training_with_object_weights_weighs_the_same_batch_differently(tmp_path):
    import torch

    nuclei = discs(10, [(20, 20), (20, 60), (60, 20), (60, 60)])
    micronuclei = discs(2, [(100, 100), (110, 110)], first_label=5)
    mask = nuclei + micronuclei
    train_sets = {"a": AnnotatedSet(["0"], [np.where(mask > 0, 200.0, 20.0).astype(np.float32)], [mask])}
    losses = {}
    for max_weight in (1.0, 10.0):
        params = TrainingParameters(batch_size=1, crop_size=64, min_train_masks=2, precision="float32",
                                    object_weight_max=max_weight)
        work = tmp_path / str(max_weight)
        losses[max_weight] = train_augmented(train_sets, work, "tiny", params, n_steps=1, warmup_steps=1,
                                             log=lambda line: None).losses[0]
    prepared = torch.load(tmp_path / "10.0" / "prepared.pt", weights_only=False)
    assert np.array_equal(prepared["object_weights"][0], object_weights(mask, 10.0).astype(np.float16))
    assert "object_weights" not in torch.load(tmp_path / "1.0" / "prepared.pt", weights_only=False)
    # Same network, same crop: only the weighting differs.
    assert np.isfinite(losses[10.0]) and losses[10.0] != pytest.approx(losses[1.0], rel=1e-3)
    with pytest.raises(ValueError, match="object_weight_max 10.0, not 5.0"):
        train_augmented(train_sets, tmp_path / "10.0", "tiny",
                        TrainingParameters(batch_size=1, crop_size=64, min_train_masks=2, precision="float32",
                                           object_weight_max=5.0), n_steps=2, warmup_steps=1, log=lambda line: None)


class LabelsAsMasks:
    """A segmenter for images that are their own label images: exact where ``exact``, else finding nothing."""

    def __init__(self, exact):
        self.exact = exact

    def segment(self, image, settings):
        masks = image.astype(np.int32) if self.exact(image) else np.zeros(image.shape, np.int32)
        return SegmentationResult(masks, settings.diameter or 10.0, settings.diameter is None)


def test_held_out_styles_are_scored_each_and_together():
    found = AnnotatedSet(["a", "b"], [squares().astype(np.float32)] * 2, [squares()] * 2)
    missed = AnnotatedSet(["c"], [squares(offset=1).astype(np.float32)], [squares(offset=1)])
    segmenter = LabelsAsMasks(lambda image: image[5, 5] > 0)
    scores = evaluate_styles(segmenter, {"s/style0": found, "s/style2": missed}, annotated_diameters=True)
    assert scores["s/style0"]["ap50"] == 1.0 and scores["s/style2"]["ap50"] == 0.0
    assert scores[ALL_HELD_OUT]["ap50"] == pytest.approx(2 / 3) and scores[ALL_HELD_OUT]["n_images"] == 3


def test_sets_by_style_keep_whole_styles_apart():
    annotated = AnnotatedSet(list("abcde"), [np.zeros((4, 4))] * 5, [np.zeros((4, 4), np.int32)] * 5)
    labels = np.array([0, 1, 2, 1, 0])
    split = StyleSplit(StyleClusters(labels, np.zeros((3, 6))), [1], *split_by_style(labels, [1]))
    train, held_out = sets_by_style("dsb", annotated, split)
    assert {k: v.names for k, v in train.items()} == {"dsb/style0": ["a", "e"], "dsb/style2": ["c"]}
    assert {k: v.names for k, v in held_out.items()} == {"dsb/style1": ["b", "d"]}


def test_holding_out_styles_of_a_set_that_is_not_trained_on_is_refused():
    from mantle_assets.orchestration.training import hold_out_styles

    with pytest.raises(ValueError, match="hold_out_styles_of='dsb' is not a training set name: use one of a, b"):
        hold_out_styles({"a": None, "b": None}, "dsb")
    assert hold_out_styles({"a": None}, None) == ({}, [])
