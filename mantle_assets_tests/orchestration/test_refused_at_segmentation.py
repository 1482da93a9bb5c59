"""Input only a run can see, refused before Cellpose works on it: real runs, real Cellpose, nothing recorded.

Registration reads headers only, so a NaN pixel, or a diameter at which Cellpose would rescale a field past the
memory budget, is found when the run reads the pixels or knows the model. Each case fails its run with one line
naming the file or the parameter, and leaves no masks entity and no mask file.
"""

import math

import numpy as np
import pytest
import tifffile

from mantle_assets.cli import root_cause
from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.imaging.segmentation import CellposeSegmenter, SegmentationSettings
from mantle_assets.models.registry import resolve_model
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.conftest import CROP, bbbc014_images, missing_data

pytestmark = pytest.mark.slow


def register(directory, instance) -> str:
    entity = register_image_directory(EntityStore(), directory, "refused at segmentation")
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])
    return entity.entity_id


def failed_run(instance, entity_id, mantle_home, **config) -> str:
    """Run the segmentation, expect it to fail having recorded and written nothing; return the root cause."""
    result = defs.resolve_job_def("segmentation_job").execute_in_process(
        run_config={"ops": {"segmentation_masks": {"config": config}}},
        instance=instance,
        partition_key=entity_id,
        raise_on_error=False,
    )
    assert not result.success
    assert EntityStore().list("segmentation_mask_directory") == []
    assert not any((mantle_home / "masks").rglob("*.tif"))
    message = root_cause(result.failure_data_for_node("segmentation_masks"))
    assert "\n" not in message
    return message


@pytest.fixture
def dna_crop():
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found")
    return np.ascontiguousarray(tifffile.imread(images / "Channel2-01-A-01.tif")[CROP]).astype(np.float32)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_pixels_fail_the_run_naming_the_file(tmp_path, instance, mantle_home, bundled_model_name,
                                                         dna_crop, bad):
    # Before: the field segmented as 0 objects (Cellpose's normalisation spreads one NaN over the whole field).
    segmenter = CellposeSegmenter(resolve_model(bundled_model_name).path, gpu=False)
    assert segmenter.segment(dna_crop, SegmentationSettings(diameter=12.0)).masks.max() > 20  # the control
    directory = tmp_path / "float plate"
    directory.mkdir()
    patched = dna_crop.copy()
    patched[40:50, 40:50] = bad
    tifffile.imwrite(directory / "01-A-01.tif", patched)
    entity_id = register(directory, instance)
    message = failed_run(instance, entity_id, mantle_home, cellpose_model=bundled_model_name, diameter="12")
    assert message == (
        f"{directory / '01-A-01.tif'}: 100 of 25600 pixel values are NaN or infinite; replace them (e.g. with 0) "
        "before registering the images"
    )


def test_a_diameter_rescaling_a_field_past_the_memory_budget_fails_before_any_work(
    tmp_path, instance, mantle_home, bundled_model_name, monkeypatch
):
    # Before: --diameter 0.3 upscaled a 256 x 256 field by 57 and took 7.9 GiB before it was killed.
    directory = tmp_path / "plate"
    directory.mkdir()
    tifffile.imwrite(directory / "01-A-01.tif", np.zeros((256, 256), np.uint8))
    entity_id = register(directory, instance)
    monkeypatch.setenv("MANTLE_MAX_IMAGE_BYTES", str(4 * 2**30))
    message = failed_run(instance, entity_id, mantle_home, cellpose_model=bundled_model_name, diameter="0.3")
    assert message.startswith(
        "diameter=0.3 px: Cellpose would rescale field 01-A-01 (256x256) by 56.7 to 14506x14506 and need about "
    )
    assert message.endswith(
        "more than the memory budget of 4.0 GiB (MANTLE_MAX_IMAGE_BYTES); the smallest diameter that fits is 0.6 px"
    )


def test_a_field_cellpose_cannot_hold_at_the_models_diameter_fails_before_any_work(
    tmp_path, instance, mantle_home, bundled_model_name, monkeypatch
):
    # The zlib bomb: a field of zeros that packs into kilobytes. Inside the reader's budget (the pixels), over
    # what Cellpose needs for it at the diameter the estimate starts from.
    directory = tmp_path / "plate"
    directory.mkdir()
    tifffile.imwrite(directory / "01-A-01.tif", np.zeros((2048, 2048), np.uint8), compression="zlib")
    monkeypatch.setenv("MANTLE_MAX_IMAGE_BYTES", str(256 * 2**20))
    entity_id = register(directory, instance)
    message = failed_run(instance, entity_id, mantle_home, cellpose_model=bundled_model_name, diameter="None")
    assert message.startswith(
        "diameter=None: estimating it from the model's 17 px, Cellpose would rescale field 01-A-01 (2048x2048) by "
        "1.0 to 2048x2048 and need about "
    )
    assert message.endswith(
        "more than the memory budget of 256.0 MiB (MANTLE_MAX_IMAGE_BYTES); split the image into tiles"
    )


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        # Before: every field segmented as 0 objects, and the masks became the directory's current ones.
        ({"batch_size": -3}, "batch_size must be a whole number >= 1 (tiles per network pass), got -3"),
        # Before: the whole plate was segmented, and the run failed when it recorded the NaN.
        (
            {"flow_threshold": math.nan},
            "flow_threshold must be a finite number >= 0 (0 turns the flow check off), got nan",
        ),
        ({"cellprob_threshold": math.inf}, "cellprob_threshold must be a finite number, got inf"),
    ],
    ids=["batch_size", "flow_threshold", "cellprob_threshold"],
)
def test_an_impossible_cellpose_option_fails_before_any_work(tmp_path, instance, mantle_home, bundled_model_name,
                                                             dna_crop, option, expected):
    directory = tmp_path / "plate"
    directory.mkdir()
    tifffile.imwrite(directory / "01-A-01.tif", dna_crop.astype(np.uint16))
    entity_id = register(directory, instance)
    assert failed_run(instance, entity_id, mantle_home, cellpose_model=bundled_model_name, **option) == expected
