"""Several image directories in one run: the range runs of backfills and of the nightly schedule."""

import logging
import time
from datetime import UTC, datetime

import numpy as np
import pytest
import tifffile
from dagster import AssetPartitionStatus, DagsterEventType, DagsterRunStatus
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from dagster._scheduler.scheduler import launch_scheduled_runs

from mantle_assets.cli import root_cause
from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import segmentation_masks
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.conftest import EIGHT_WELLS, register_crop_per_well
from mantle_assets_tests.orchestration.test_schedules import preview, requests

pytestmark = pytest.mark.slow


@pytest.fixture
def three_plates(tmp_path, instance, bundled_model_name):
    """Three adjacent partitions without masks; the second's experiment asks for a channel its images lack."""
    store = EntityStore()
    defaults = [
        {"diameter": "12"},
        {"diameter": "12", "nuclei_channel": 3, "cytoplasm_channel": 3},
        {"diameter": "15"},
    ]
    plates = [
        store.update(entity.entity_id, {"segmentation_defaults": {"cellpose_model": bundled_model_name, **own}})
        for entity, own in zip(register_crop_per_well(tmp_path, store, EIGHT_WELLS[:3], "batch"), defaults, strict=True)
    ]
    instance.add_dynamic_partitions(image_directory_partitions.name, [p.entity_id for p in plates])
    return plates


def test_a_nightly_range_segments_each_directory_with_its_experiments_defaults(instance, three_plates):
    good, bad, other = three_plates
    (request,) = requests(instance)

    result = defs.resolve_job_def("segmentation_job").execute_in_process(
        run_config=request.run_config, tags=request.tags, instance=instance, raise_on_error=False
    )

    assert not result.success
    store = EntityStore()
    masks = {m.properties["source_entity"]: m for m in store.list("segmentation_mask_directory")}
    assert set(masks) == {good.entity_id, other.entity_id}
    assert {key: m.properties["diameter"] for key, m in masks.items()} == {good.entity_id: "12", other.entity_id: "15"}
    assert {m.properties["run_id"] for m in masks.values()} == {result.run_id}

    materialized = result.asset_materializations_for_node("segmentation_masks")
    assert {m.partition: m.metadata["output_entity"].value for m in materialized} == {
        key: m.entity_id for key, m in masks.items()}
    status = instance.get_status_by_partition(
        segmentation_masks.key, [p.entity_id for p in three_plates], image_directory_partitions
    )
    assert status == {
        good.entity_id: AssetPartitionStatus.MATERIALIZED,
        bad.entity_id: AssetPartitionStatus.FAILED,
        other.entity_id: AssetPartitionStatus.MATERIALIZED,
    }

    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert root_cause(failure.step_failure_data).endswith(
        f"1 of 3 image directories failed: {bad.entity_id}: nuclei_channel=3 but the images have 1 channel(s)")
    loads = [e for e in instance.all_logs(result.run_id) if (e.user_message or "").startswith("loaded model")]
    assert len(loads) == 1

    assert preview(instance) == {bad.entity_id: "no masks"}


def test_the_scheduler_launches_the_nightly_range_as_one_run(instance, three_plates):
    """Dagster's own scheduler and run queue iterations, the run in a process of its own."""
    good, bad, other = three_plates
    target = ModuleTarget(
        module_name="mantle_assets.definitions", attribute="defs", working_directory=None, location_name="mantle"
    )
    logger = logging.getLogger("scheduler")
    with create_test_daemon_workspace_context(target, instance) as workspace:
        for now in (datetime(2026, 11, 27, 1, 59, tzinfo=UTC), datetime(2026, 11, 27, 2, 0, 5, tzinfo=UTC)):
            with freeze_time(now):
                list(launch_scheduled_runs(workspace, logger, now, iteration_times={}))
        (run,) = instance.get_runs()
        run_queue = QueuedRunCoordinatorDaemon(interval_seconds=1)
        deadline = time.monotonic() + 600
        while not instance.get_run_by_id(run.run_id).is_finished:
            assert time.monotonic() < deadline, "the scheduled run did not finish"
            list(run_queue.run_iteration(workspace))
            time.sleep(1)

    run = instance.get_run_by_id(run.run_id)
    assert run.tags["dagster/schedule_name"] == "stale_segmentation_schedule"
    assert (run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]) == (
        good.entity_id, other.entity_id)
    assert run.status == DagsterRunStatus.FAILURE  # the bad directory; the others are done
    masks = EntityStore().list("segmentation_mask_directory")
    assert sorted(m.properties["source_entity"] for m in masks) == [good.entity_id, other.entity_id]
    assert {m.properties["run_id"] for m in masks} == {run.run_id}


def test_a_directory_without_objects_fails_only_itself(tmp_path, instance, bundled_model_name, mantle_home):
    store = EntityStore()
    (good,) = register_crop_per_well(tmp_path, store, EIGHT_WELLS[:1], "batch")
    blank_directory = tmp_path / "blank"
    blank_directory.mkdir()
    tifffile.imwrite(blank_directory / "01-A-01.tif", np.zeros((160, 160), np.uint16))
    blank = register_image_directory(store, blank_directory, "batch")
    instance.add_dynamic_partitions(image_directory_partitions.name, [good.entity_id, blank.entity_id])

    config = {"cellpose_model": bundled_model_name, "diameter": "12"}
    result = defs.resolve_job_def("segmentation_job").execute_in_process(
        run_config={"ops": {"segmentation_masks": {"config": config}}},
        tags={"dagster/asset_partition_range_start": good.entity_id,
              "dagster/asset_partition_range_end": blank.entity_id},
        instance=instance,
        raise_on_error=False,
    )

    assert not result.success
    (masks,) = EntityStore().list("segmentation_mask_directory")
    assert masks.properties["source_entity"] == good.entity_id and masks.properties["total_cells"] > 0
    status = instance.get_status_by_partition(
        segmentation_masks.key, [good.entity_id, blank.entity_id], image_directory_partitions
    )
    assert status == {good.entity_id: AssetPartitionStatus.MATERIALIZED, blank.entity_id: AssetPartitionStatus.FAILED}
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert root_cause(failure.step_failure_data).endswith(
        f"1 of 2 image directories failed: {blank.entity_id}: 0 objects in the only field with {bundled_model_name} "
        "(nuclei_channel=0, cytoplasm_channel=0, diameter=12): check the channel and diameter")
    assert not (mantle_home / "masks" / blank.entity_id).exists()
