"""Images and masks on object storage, end to end: a real local S3 server (moto) reached through s3fs,
a real entity store, a real Dagster instance and, where marked slow, real Cellpose."""

import io
import subprocess
import sys
import uuid

import numpy as np
import pytest
import tifffile
from dagster import AssetKey, DagsterRunStatus

from mantle_assets.cli import root_cause
from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.recovery import HOST_TAG, PID_TAG, fail_abandoned_runs, process_run_tags
from mantle_assets.registration import register_image_directory
from mantle_assets.storage import remote_fingerprint
from mantle_assets_tests.orchestration.test_schedules import preview, record_current_masks
from mantle_assets_tests.orchestration.test_segmentation_asset import dna_nuclei, run_segmentation


@pytest.fixture
def mask_root(s3, monkeypatch) -> str:
    monkeypatch.setenv("MANTLE_MASK_ROOT", s3.uri("masks"))
    return s3.uri("masks")


@pytest.fixture
def remote_crops(s3, bbbc014_crops, instance):
    """The two BBBC014 crops uploaded to s3://lab/plates/crops and registered from there."""
    uri = s3.put_directory(bbbc014_crops, "plates/crops")
    entity = register_image_directory(EntityStore(), uri, "crops", channel_names=["NFkB", "DNA"])
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])
    return entity


def staged(mantle_home) -> list[str]:
    staging = mantle_home / "staging"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


@pytest.mark.slow
def test_s3_images_to_s3_masks_to_measurements(remote_crops, mask_root, s3, instance, bundled_model_name, mantle_home):
    result = run_segmentation(instance, remote_crops.entity_id, **dna_nuclei(bundled_model_name))
    assert result.success
    store = EntityStore()
    (masks,) = store.list("segmentation_mask_directory")
    prefix = f"masks/{remote_crops.entity_id}/{result.run_id}"
    assert masks.properties["mask_directory"] == s3.uri(prefix)
    assert masks.properties["source_fingerprint"] == remote_fingerprint(remote_crops.properties["image_directory"])[1]
    (edge,) = store.parents(masks.entity_id)
    assert (edge.parent_id, edge.pipeline, edge.run_id) == (remote_crops.entity_id, "cellpose-segmentation",
                                                            result.run_id)

    assert s3.keys("masks/") == [f"{prefix}/01-A-01_cp_masks.tif", f"{prefix}/12-A-12_cp_masks.tif"]
    counts = {}
    for key in s3.keys("masks/"):
        labels = tifffile.imread(io.BytesIO(s3.read(key)))
        assert labels.dtype == np.uint16 and labels.shape == (160, 160)
        assert len(np.unique(labels)) - 1 == labels.max() >= 10  # consecutive labels, dozens of nuclei
        counts[key.rsplit("/", 1)[1].removesuffix("_cp_masks.tif")] = int(labels.max())
    assert masks.properties["cells_per_field"] == counts
    assert not (mantle_home / "masks").exists()  # nothing written beside the bucket
    assert staged(mantle_home) == []

    measured_run = defs.resolve_job_def("measurement_job").execute_in_process(
        instance=instance, partition_key=remote_crops.entity_id, raise_on_error=False,
        run_config={"ops": {"assay_readout": {"config": {"min_cells": 5}}}},
    )
    assert measured_run.success, root_cause(measured_run.get_step_failure_events()[0].step_failure_data)
    (measured,) = store.list("cell_measurement_table")
    assert measured.properties["objects_per_field"] == counts
    assert {e.parent_id for e in store.parents(measured.entity_id)} == {masks.entity_id, remote_crops.entity_id}
    assert staged(mantle_home) == []


def test_a_failed_record_leaves_no_masks_and_no_entity(remote_crops, mask_root, s3, instance, bundled_model_name,
                                                       mantle_home, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("entity store unreachable")

    # The fault: the entity store fails at the commit point, after the masks were uploaded.
    monkeypatch.setattr(EntityStore, "record_output", unreachable)
    result = run_segmentation(instance, remote_crops.entity_id, **dna_nuclei(bundled_model_name, "12"))
    assert not result.success
    assert root_cause(result.failure_data_for_node("segmentation_masks")) == "ConnectionError: entity store unreachable"
    assert s3.keys("masks/") == []
    assert EntityStore().list("segmentation_mask_directory") == []
    assert EntityStore().children(remote_crops.entity_id) == []
    assert staged(mantle_home) == []


@pytest.fixture
def remote_plate(s3, tmp_path, instance):
    """A one-field plate of small synthetic images, uploaded and registered."""
    local = tmp_path / "small plate"
    local.mkdir()
    for channel in (1, 2):
        tifffile.imwrite(local / f"Channel{channel}-01-A-01.tif", np.full((8, 8), channel, np.uint8))
    entity = register_image_directory(EntityStore(), s3.put_directory(local, "plates/small"), "small")
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])
    return entity


def test_observations_and_the_nightly_check_follow_the_objects(remote_plate, s3, instance, tmp_path):
    def observed_version():
        assert defs.resolve_job_def("observe_image_directories_job").execute_in_process(instance=instance).success
        (record,) = instance.fetch_observations(AssetKey("image_directory"), limit=1).records
        return record.asset_observation.data_version

    before = observed_version()
    assert before.startswith("2 files, sha256 ")
    record_current_masks(remote_plate, tmp_path)
    assert preview(instance) == {}

    rewritten = io.BytesIO()
    tifffile.imwrite(rewritten, np.full((8, 8), 7, np.uint8))  # same size, other pixels: only the ETag tells
    s3.client.put_object(Bucket=s3.bucket, Key="plates/small/Channel1-01-A-01.tif", Body=rewritten.getvalue())
    assert observed_version() not in (before, "missing")
    assert preview(instance) == {remote_plate.entity_id: "images changed"}

    for key in s3.keys("plates/small/"):
        s3.client.delete_object(Bucket=s3.bucket, Key=key)
    assert observed_version() == "missing"
    assert preview(instance) == {}  # a vanished directory is not requested: its run could only fail


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("recorded", [False, True])
def test_recovery_removes_a_dead_runs_unrecorded_upload(remote_plate, mask_root, s3, instance, mantle_home, recorded):
    job = defs.resolve_job_def("segmentation_job")
    run = instance.create_run_for_job(
        job, run_id=str(uuid.uuid4()), status=DagsterRunStatus.STARTED,
        tags={**process_run_tags(), PID_TAG: str(dead_pid()), "dagster/partition": remote_plate.entity_id},
    )
    assert run.tags[HOST_TAG]
    prefix = f"masks/{remote_plate.entity_id}/{run.run_id}"
    s3.client.put_object(Bucket=s3.bucket, Key=f"{prefix}/01-A-01_cp_masks.tif", Body=b"half an upload")
    s3.client.put_object(Bucket=s3.bucket, Key="masks/E999999/other-run/01-A-01_cp_masks.tif", Body=b"another's")
    copy = mantle_home / "staging" / f"{run.run_id}-abc123" / "small"
    copy.mkdir(parents=True)
    if recorded:  # the process died between recording the entity and reporting success
        EntityStore().record_output(
            "segmentation_mask_directory", "small masks",
            {"mask_directory": s3.uri(prefix), "source_entity": remote_plate.entity_id, "cellpose_model": "m",
             "nuclei_channel": 2, "cytoplasm_channel": 2, "diameter": "None", "run_id": run.run_id},
            parents=[remote_plate.entity_id], pipeline="cellpose-segmentation", run_id=run.run_id, parameters={},
        )

    assert fail_abandoned_runs(instance) == [run.run_id]
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    assert staged(mantle_home) == []
    expected = [f"{prefix}/01-A-01_cp_masks.tif"] if recorded else []
    assert s3.keys("masks/") == [*expected, "masks/E999999/other-run/01-A-01_cp_masks.tif"]
