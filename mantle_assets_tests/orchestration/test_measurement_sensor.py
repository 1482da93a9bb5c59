"""The sensor that measures newly segmented directories, on a real instance and entity store."""

import pytest
from dagster import AssetMaterialization, build_sensor_context

from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import current_masks
from mantle_assets.orchestration.measurements import MEASUREMENT_PIPELINE, MEASUREMENT_TABLE
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.sensors import segmented_directory_sensor
from mantle_assets_tests.conftest import TWO_WELLS, register_crop_per_well
from mantle_assets_tests.orchestration.test_schedules import plates, record_current_masks  # noqa: F401


def segmented(instance, entity, tmp_path, run_id=None):
    """Masks recorded for the entity, and their materialization, as a segmentation run leaves them."""
    record_current_masks(entity, tmp_path, run_id)
    instance.report_runless_asset_event(AssetMaterialization("segmentation_masks", partition=entity.entity_id))


def measured(entity, tmp_path):
    """A measurement table of the entity's current masks, as cell_measurements records it."""
    masks = current_masks(EntityStore(), entity.entity_id)
    table = tmp_path / f"{entity.entity_id}.parquet"
    table.write_bytes(b"")
    EntityStore().record_output(
        MEASUREMENT_TABLE, f"{entity.name} measurements",
        {"measurement_file": str(table), "mask_entity": masks.entity_id, "source_entity": entity.entity_id,
         "mask_run_id": masks.properties["run_id"]},
        parents=[masks.entity_id, entity.entity_id], pipeline=MEASUREMENT_PIPELINE, run_id="measuring",
        parameters={"ring_width": 5},
    )


def tick(instance, cursor=None):
    with build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as context:
        return segmented_directory_sensor(context)


def test_nothing_segmented_skips(instance, plates):  # noqa: F811
    result = tick(instance)
    assert result.skip_reason and not result.run_requests


def test_each_new_masks_get_one_measurement_run(instance, plates, tmp_path):  # noqa: F811
    segmented(instance, plates[0], tmp_path)
    segmented(instance, plates[2], tmp_path)
    first = tick(instance)
    assert [r.partition_key for r in first.run_requests] == [plates[0].entity_id, plates[2].entity_id]
    assert len({r.run_key for r in first.run_requests}) == 2
    assert not tick(instance, first.cursor).run_requests


def test_masks_already_measured_are_not_measured_again(instance, plates, tmp_path):  # noqa: F811
    segmented(instance, plates[0], tmp_path)
    measured(plates[0], tmp_path)
    result = tick(instance)
    assert result.run_requests == [] and result.cursor is not None


def test_masks_made_again_after_measuring_are_measured(instance, plates, tmp_path):  # noqa: F811
    segmented(instance, plates[0], tmp_path)
    measured(plates[0], tmp_path)
    cursor = tick(instance).cursor
    segmented(instance, plates[0], tmp_path / "again", run_id="another run")
    (request,) = tick(instance, cursor).run_requests
    assert request.partition_key == plates[0].entity_id


def test_archived_directories_are_not_measured(instance, plates, tmp_path):  # noqa: F811
    segmented(instance, plates[1], tmp_path)
    instance.delete_dynamic_partition("image_directory", plates[1].entity_id)
    assert tick(instance).run_requests == []


@pytest.mark.slow
def test_a_segmentation_run_is_followed_by_its_measurement(instance, tmp_path, bundled_model_name):
    store = EntityStore()
    (plate,) = register_crop_per_well(tmp_path, store, TWO_WELLS[:1], "measured")
    instance.add_dynamic_partitions(image_directory_partitions.name, [plate.entity_id])
    config = {"cellpose_model": bundled_model_name, "diameter": "12"}
    segmentation = defs.resolve_job_def("segmentation_job").execute_in_process(
        run_config={"ops": {"segmentation_masks": {"config": config}}},
        instance=instance, partition_key=plate.entity_id,
    )

    (request,) = tick(instance).run_requests
    measurement = defs.resolve_job_def(request.job_name or "measurement_job").execute_in_process(
        instance=instance, partition_key=request.partition_key, run_config=request.run_config
    )

    assert measurement.success
    masks = current_masks(store, plate.entity_id)
    assert masks.properties["run_id"] == segmentation.run_id
    (table,) = store.list(MEASUREMENT_TABLE)
    assert (table.properties["mask_entity"], table.properties["mask_run_id"]) == (masks.entity_id, segmentation.run_id)
    assert not tick(instance).run_requests  # measured now: a tick from the start finds nothing to do
