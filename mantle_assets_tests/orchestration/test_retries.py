"""A step that finds the entity store busy is retried, and records its output once; an unusable store is not."""

import threading
import time

import filelock
import pytest
from dagster import DagsterEventType, EventRecordsFilter, materialize

from mantle_assets.cli import root_cause
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import segmentation_masks
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.resources import CellposeResource, EntityStoreResource
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.conftest import TWO_WELLS, fill_disk, register_crop_per_well

pytestmark = pytest.mark.slow

LOCK_TIMEOUT = 0.5


def hold_lock(store: EntityStore, until) -> None:
    """Hold the store's inter-process lock from another thread, as a second process would, until ``until()``."""
    held = threading.Event()

    def hold():
        with filelock.FileLock(str(store.database) + ".lock"):
            held.set()
            deadline = time.monotonic() + 600
            while not until() and time.monotonic() < deadline:
                time.sleep(0.1)

    threading.Thread(target=hold, daemon=True).start()
    held.wait()


def retries_requested(instance) -> int:
    return len(instance.get_event_records(EventRecordsFilter(DagsterEventType.STEP_UP_FOR_RETRY)))


def test_busy_store_is_retried_and_output_recorded_once(bbbc014_crops, instance, bundled_model_name):
    store = EntityStore()
    source = register_image_directory(store, bbbc014_crops, "crops")
    instance.add_dynamic_partitions(image_directory_partitions.name, [source.entity_id])

    # Busy until the first attempt has given up, free for the retry.
    hold_lock(store, until=lambda: retries_requested(instance) > 0)
    result = materialize(
        [segmentation_masks],
        partition_key=source.entity_id,
        instance=instance,
        resources={"entity_store": EntityStoreResource(lock_timeout=LOCK_TIMEOUT), "cellpose": CellposeResource()},
        run_config={"ops": {"segmentation_masks": {"config": {
            "cellpose_model": bundled_model_name, "nuclei_channel": 2, "cytoplasm_channel": 2, "diameter": "12"}}}},
    )

    assert result.success
    event_types = [event.event_type for event in result.all_events]
    assert event_types.count(DagsterEventType.STEP_UP_FOR_RETRY) == 1
    (masks,) = store.list("segmentation_mask_directory")
    (edge,) = store.children(source.entity_id)
    assert (edge.child_id, edge.run_id) == (masks.entity_id, result.run_id)


def test_store_busy_beyond_the_retries_fails_the_run(bbbc014_crops, instance, bundled_model_name):
    store = EntityStore()
    source = register_image_directory(store, bbbc014_crops, "crops")
    instance.add_dynamic_partitions(image_directory_partitions.name, [source.entity_id])

    released = threading.Event()
    hold_lock(store, until=released.is_set)
    result = materialize(
        [segmentation_masks],
        partition_key=source.entity_id,
        instance=instance,
        resources={"entity_store": EntityStoreResource(lock_timeout=LOCK_TIMEOUT), "cellpose": CellposeResource()},
        run_config={"ops": {"segmentation_masks": {"config": {"cellpose_model": bundled_model_name}}}},
        raise_on_error=False,
    )

    released.set()
    assert not result.success
    event_types = [event.event_type for event in result.all_events]
    assert event_types.count(DagsterEventType.STEP_UP_FOR_RETRY) == 3


def test_a_retried_range_skips_the_directories_it_already_materialized(tmp_path, instance, bundled_model_name):
    store = EntityStore()
    first, second = register_crop_per_well(tmp_path, store, TWO_WELLS, "batch")
    instance.add_dynamic_partitions(image_directory_partitions.name, [first.entity_id, second.entity_id])

    def busy_after_the_first_materialization():
        deadline = time.monotonic() + 600
        while not instance.get_event_records(EventRecordsFilter(DagsterEventType.ASSET_MATERIALIZATION)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        hold_lock(store, until=lambda: retries_requested(instance) > 0)

    threading.Thread(target=busy_after_the_first_materialization, daemon=True).start()
    result = materialize(
        [segmentation_masks],
        instance=instance,
        tags={"dagster/asset_partition_range_start": first.entity_id,
              "dagster/asset_partition_range_end": second.entity_id},
        resources={"entity_store": EntityStoreResource(lock_timeout=LOCK_TIMEOUT), "cellpose": CellposeResource()},
        run_config={"ops": {"segmentation_masks": {"config": {
            "cellpose_model": bundled_model_name, "diameter": "12"}}}},
    )

    assert result.success
    event_types = [event.event_type for event in result.all_events]
    assert event_types.count(DagsterEventType.STEP_UP_FOR_RETRY) == 1
    # Each directory segmented, recorded and materialized once: the retry did only the second.
    assert sorted(m.partition for m in result.asset_materializations_for_node("segmentation_masks")) == sorted(
        [first.entity_id, second.entity_id])
    for source in (first, second):
        (edge,) = store.children(source.entity_id)
        assert edge.run_id == result.run_id


def test_a_full_disk_under_the_store_fails_a_batch_at_once(tmp_path, instance, bundled_model_name, small_disk,
                                                           monkeypatch):
    monkeypatch.setenv("MANTLE_ENTITY_STORE", str(small_disk / "mantle.duckdb"))
    store = EntityStore()
    first, second = register_crop_per_well(tmp_path, store, TWO_WELLS, "batch")
    instance.add_dynamic_partitions(image_directory_partitions.name, [first.entity_id, second.entity_id])
    filler = fill_disk(small_disk)

    result = materialize(
        [segmentation_masks],
        instance=instance,
        tags={"dagster/asset_partition_range_start": first.entity_id,
              "dagster/asset_partition_range_end": second.entity_id},
        resources={"entity_store": EntityStoreResource(), "cellpose": CellposeResource()},  # 300 s lock timeout
        run_config={"ops": {"segmentation_masks": {"config": {
            "cellpose_model": bundled_model_name, "diameter": "12"}}}},
        raise_on_error=False,
    )

    assert not result.success
    assert DagsterEventType.STEP_UP_FOR_RETRY not in [event.event_type for event in result.all_events]
    # The first directory's own error, not a batch's list of both: the second was never segmented.
    assert root_cause(result.failure_data_for_node("segmentation_masks")) == (
        f"the disk holding {store.database} is full (No space left on device); nothing was "
        "written: free some space, then run again")
    filler.unlink()
    assert store.list("segmentation_mask_directory") == []
