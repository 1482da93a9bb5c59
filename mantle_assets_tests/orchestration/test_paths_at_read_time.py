"""Paths checked when runs read them, not only at registration: real files, real links, a real Dagster instance.

Each case replaces a registered file by a symbolic link to one outside ``MANTLE_DATA_ROOTS`` (or, without roots,
to a system file) and checks that the run reading it fails with one line naming the file and records nothing.
No case loads a network: the images are checked before the model is.
"""

import shutil

import numpy as np
import pytest
import tifffile

from mantle_assets.cli import root_cause
from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import prepare_segmentation
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.registration import register_image_directory
from mantle_assets.settings import OutsideDataRootsError

WELLS = ("01-A-01", "02-A-02")


@pytest.fixture
def data(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("MANTLE_DATA_ROOTS", str(root))
    return root


@pytest.fixture
def outside(tmp_path):
    """An image outside the data roots, readable and of the plate's shape."""
    folder = tmp_path / "outside"
    folder.mkdir()
    tifffile.imwrite(folder / "secret.tif", np.full((16, 16), 7, np.uint8))
    return folder / "secret.tif"


def registered_plate(data, instance, *, layout=False):
    """A two-well, two-channel plate with a square nucleus per field, registered with its partition."""
    plate = data / "plate"
    plate.mkdir()
    for well in WELLS:
        for channel in (1, 2):
            pixels = np.zeros((16, 16), np.uint8)
            pixels[4:12, 4:12] = 100 * channel
            tifffile.imwrite(plate / f"Channel{channel}-{well}.tif", pixels)
    plate_layout = None
    if layout:
        plate_layout = data / "layout.csv"
        plate_layout.write_text("well,dose,control\nA01,0,-1\nA02,0,1\n")
    entity = register_image_directory(EntityStore(), plate, "paths", plate_layout=plate_layout)
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])
    return entity, plate


def replaced_by_link(path, target):
    path.unlink()
    path.symlink_to(target)


def run_job(instance, job, entity_id, run_config=None):
    return defs.resolve_job_def(job).execute_in_process(
        run_config=run_config, instance=instance, partition_key=entity_id, raise_on_error=False
    )


def record_masks(entity, folder):
    """Hand-made masks (the square of each field) recorded as the entity's current masks."""
    folder.mkdir(parents=True)
    labels = np.zeros((16, 16), np.uint16)
    labels[4:12, 4:12] = 1
    for well in WELLS:
        tifffile.imwrite(folder / f"{well}_cp_masks.tif", labels)
    EntityStore().record_output(
        "segmentation_mask_directory",
        f"{entity.name} masks",
        {"mask_directory": folder, "source_entity": entity.entity_id, "cellpose_model": "hand", "nuclei_channel": 2,
         "cytoplasm_channel": 2, "diameter": "None", "run_id": "run-hand", "cells_per_field": dict.fromkeys(WELLS, 1)},
        parents=[entity.entity_id],
        pipeline="cellpose-segmentation",
        run_id="run-hand",
        parameters={},
    )


def test_an_image_replaced_by_a_link_out_of_the_roots_is_not_segmented(data, outside, instance, mantle_home):
    entity, plate = registered_plate(data, instance)
    replaced_by_link(plate / "Channel1-02-A-02.tif", outside)
    expected = f"{entity.entity_id}: image file {outside} is outside the data roots (MANTLE_DATA_ROOTS={data})"
    # What `mantle segment` checks before a run exists...
    with pytest.raises(OutsideDataRootsError) as error:
        prepare_segmentation(EntityStore(), entity.entity_id, SegmentationConfig(nuclei_channel=2, cytoplasm_channel=2))
    assert str(error.value) == expected
    # ...and a run launched otherwise (the UI, a sensor, the schedule).
    result = run_job(instance, "segmentation_job", entity.entity_id)
    assert not result.success
    assert root_cause(result.failure_data_for_node("segmentation_masks")) == expected
    assert [e.entity_id for e in EntityStore().list()] == [entity.entity_id]
    assert not (mantle_home / "masks").exists() or not any((mantle_home / "masks").rglob("*.tif"))


def test_without_roots_an_image_replaced_by_a_link_to_a_system_file_is_not_segmented(
    data, instance, monkeypatch
):
    entity, plate = registered_plate(data, instance)
    monkeypatch.delenv("MANTLE_DATA_ROOTS")
    replaced_by_link(plate / "Channel2-01-A-01.tif", "/etc/passwd")
    result = run_job(instance, "segmentation_job", entity.entity_id)
    assert root_cause(result.failure_data_for_node("segmentation_masks")) == (
        f"{entity.entity_id}: image file /etc/passwd is in a system directory; set MANTLE_DATA_ROOTS to the "
        "folders that hold your data")


def test_a_model_path_out_of_the_roots_in_a_run_config_is_refused(data, tmp_path, instance, bundled_model_name):
    from mantle_assets.models.registry import resolve_model

    entity, _ = registered_plate(data, instance)
    (tmp_path / "outside").mkdir()
    shutil.copyfile(resolve_model(bundled_model_name).path, tmp_path / "outside" / "model")
    # As the UI's launchpad sends it: a path that climbs out of the roots.
    config = {"cellpose_model": f"{data}/../outside/model", "nuclei_channel": 2, "cytoplasm_channel": 2}
    run_config = {"ops": {"segmentation_masks": {"config": config}}}
    result = run_job(instance, "segmentation_job", entity.entity_id, run_config)
    assert root_cause(result.failure_data_for_node("segmentation_masks")) == (
        f"cellpose_model {tmp_path}/outside/model is outside the data roots (MANTLE_DATA_ROOTS={data})")
    assert EntityStore().list("segmentation_mask_directory") == []


def test_a_directory_replaced_by_a_link_out_of_the_roots_is_not_read(data, outside, instance):
    entity, plate = registered_plate(data, instance)
    plate.rename(data / "moved")
    plate.symlink_to(outside.parent)
    with pytest.raises(OutsideDataRootsError) as error:
        prepare_segmentation(EntityStore(), entity.entity_id, SegmentationConfig())
    assert str(error.value) == (
        f"{entity.entity_id}: image_directory {outside.parent} is outside the data roots (MANTLE_DATA_ROOTS={data})")


def test_an_image_replaced_by_a_link_out_of_the_roots_is_not_measured(data, outside, instance, mantle_home):
    entity, plate = registered_plate(data, instance)
    record_masks(entity, mantle_home / "hand masks")
    replaced_by_link(plate / "Channel1-01-A-01.tif", outside)
    result = run_job(instance, "measurement_job", entity.entity_id)
    assert not result.success
    assert root_cause(result.failure_data_for_node("cell_measurements")) == (
        f"{entity.entity_id}: image file {outside} is outside the data roots (MANTLE_DATA_ROOTS={data})")
    assert EntityStore().list("cell_measurement_table") == []


def test_a_plate_layout_replaced_by_a_link_out_of_the_roots_is_not_read(data, instance, mantle_home, tmp_path):
    entity, _ = registered_plate(data, instance, layout=True)
    record_masks(entity, mantle_home / "hand masks")
    secret = tmp_path / "outside.csv"
    secret.write_text("well,dose,control\nA01,0,-1\n")
    replaced_by_link(data / "layout.csv", secret)
    result = run_job(instance, "measurement_job", entity.entity_id)
    assert not result.success
    assert root_cause(result.failure_data_for_node("assay_readout")) == (
        f"plate_layout {secret} is outside the data roots (MANTLE_DATA_ROOTS={data})")
    assert len(EntityStore().list("cell_measurement_table")) == 1  # measured: the images are where they were
    assert EntityStore().list("assay_readout") == []
