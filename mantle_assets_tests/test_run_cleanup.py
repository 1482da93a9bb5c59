"""After a run of any origin fails, what it left and never recorded goes; what it recorded stays.

The daemon's ``ended_run_cleanup_sensor`` and the CLI's start share one cleanup
(:func:`~mantle_assets.orchestration.recovery.clean_up_ended_runs`). Here the leftovers
of a killed run are laid out as the platform's steps write them, the run is failed as
Dagster's run monitoring fails it, and the sensor is evaluated against the real instance
and store. A register killed between recording the entity and adding its partition is
healed by the next CLI run.
"""

import json
import os
import subprocess
import sys

from dagster import DagsterRunStatus, SensorResult, build_sensor_context
from dagster._core.test_utils import create_run_for_test

from mantle_assets.atomic import PARTIAL_PREFIX, UNRECORDED_SUFFIX
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.partitions import image_directory_partitions, partition_key
from mantle_assets.orchestration.recovery import PARTITION_TAG, ended_run_cleanup_sensor
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.test_interrupts import WELLS, plate


def folder(path, contents="half_cp_masks.tif"):
    path.mkdir(parents=True)
    (path / contents).write_bytes(b"")
    return path


def record_masks(store, source, directory, run_id):
    return store.record_output(
        "segmentation_mask_directory", "masks",
        {"mask_directory": str(directory), "source_entity": source.entity_id, "cellpose_model": "cpsam",
         "nuclei_channel": 0, "cytoplasm_channel": 0, "diameter": "12"},
        parents=[source.entity_id], pipeline="cellpose-segmentation", run_id=run_id, parameters={},
    )


def test_the_sensor_removes_what_a_failed_run_left_unrecorded_once(tmp_path, mantle_home, instance):
    store = EntityStore()
    source = register_image_directory(store, plate(tmp_path, "plate", WELLS[:1], 256), "cleanup")
    other = register_image_directory(store, plate(tmp_path, "other", WELLS[1:2], 256), "cleanup")
    killed = create_run_for_test(instance, job_name="segmentation_job", status=DagsterRunStatus.STARTED,
                                 tags={PARTITION_TAG: source.entity_id})
    run_id = killed.run_id
    masks = mantle_home / "masks"
    partial = folder(masks / other.entity_id / f"{PARTIAL_PREFIX}{run_id}")
    staged = folder(mantle_home / "staging" / f"{run_id}-{source.entity_id}-images")
    # Renamed into place, then killed before recording.
    unrecorded = folder(masks / source.entity_id / run_id)
    measurements = folder(mantle_home / "measurements" / source.entity_id / run_id, "cells.parquet")
    model = folder(mantle_home / "models" / "mine" / run_id, "weights")
    # Recorded before the run died (a plate of a multi-plate run): the entity's, kept.
    recorded = folder(masks / other.entity_id / run_id)
    record_masks(store, other, recorded, run_id)
    # Contact sheets: one renamed into place and one half-written before the kill, and the recorded plate's.
    previews = mantle_home / "previews"
    unrecorded_preview = folder(previews / source.entity_id, f"{run_id}.png") / f"{run_id}.png"
    partial_preview = folder(previews / "E999999", f"{PARTIAL_PREFIX}{run_id}") / f"{PARTIAL_PREFIX}{run_id}"
    recorded_preview = folder(previews / other.entity_id, f"{run_id}.png") / f"{run_id}.png"
    instance.event_log_storage.set_concurrency_slots("gpu", 1)
    assert instance.event_log_storage.claim_concurrency_slot("gpu", run_id, "segmentation_masks").is_claimed
    untouched = create_run_for_test(instance, job_name="segmentation_job", status=DagsterRunStatus.STARTED)
    running = folder(masks / source.entity_id / f"{PARTIAL_PREFIX}{untouched.run_id}")

    instance.report_run_failed(killed, message="worker killed")
    result = ended_run_cleanup_sensor(build_sensor_context(instance=instance))

    assert isinstance(result, SensorResult) and not result.run_requests
    for gone in (partial, staged, unrecorded, measurements, model, unrecorded_preview, partial_preview):
        assert not gone.exists(), gone
    assert (model.parent / f"{run_id}{UNRECORDED_SUFFIX}" / "weights").exists()
    assert recorded.exists() and running.exists() and recorded_preview.exists()
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert run_id not in info.active_run_ids | info.pending_run_ids

    # The next tick reads only run failures after its cursor: a new leftover of the same run stays.
    again = folder(masks / source.entity_id / run_id)
    skipped = ended_run_cleanup_sensor(build_sensor_context(instance=instance, cursor=result.cursor))
    assert skipped.skip_reason is not None and again.exists()
    assert set(json.loads(result.cursor)) == {"RUN_FAILURE"}


def test_a_cli_run_adds_the_partitions_killed_registers_did_not(tmp_path, mantle_home, instance):
    store = EntityStore()
    # What `mantle register` killed after recording the entity and before adding its partition leaves.
    orphans = [register_image_directory(store, plate(tmp_path, name, WELLS[:1], 256), "healing")
               for name in ("first", "second")]
    assert not instance.get_dynamic_partitions(image_directory_partitions.name)

    # Any run the CLI starts heals them all; this one, training on folders that do not exist, then fails.
    missing = tmp_path / "no such folder"
    run = subprocess.run(
        [sys.executable, "-m", "mantle_assets.cli", "train", "--train", f"a={missing}", "--val", str(missing)],
        capture_output=True, text=True, timeout=300, env=os.environ,
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert set(instance.get_dynamic_partitions(image_directory_partitions.name)) == {partition_key(o) for o in orphans}
