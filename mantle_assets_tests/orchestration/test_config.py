"""Parameters as typed in the launchpad: every form Mantle reads is accepted, and what cannot work is refused.

Dagster's own config validation (what the launchpad's editor asks before it launches) takes ``diameter`` as a
number, text or null and a channel as a number or a name; the run reads them as ``mantle segment`` does and
records the same canonical values. A request that cannot work fails its run with a ``dagster.Failure`` whose
description is the one-line reason, before any image is read: the images are deleted after registration
here, so a check made after staging would fail on the missing files instead.
"""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from dagster import DagsterEventType, Definitions, RetryPolicy, define_asset_job, validate_run_config
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import image_directory, segmentation_masks
from mantle_assets.orchestration.config import PLATFORM_DEFAULTS, SegmentationConfig
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.resources import CellposeResource, EntityStoreResource
from mantle_assets.orchestration.schedules import RESULT_PARAMETERS, recorded_parameters
from mantle_assets.orchestration.sensors import default_segmentation_config
from mantle_assets.registration import register_image_directory


def run_config(**config) -> dict:
    return {"ops": {"segmentation_masks": {"config": config}}}


def register_plate(directory, instance, defaults=None):
    """A two-channel (NFkB, DNA) one-field directory, registered with its partition."""
    directory.mkdir()
    for channel in (1, 2):
        tifffile.imwrite(directory / f"Channel{channel}-01-A-01.tif", np.zeros((16, 16), np.uint8))
    entity = register_image_directory(
        EntityStore(), directory, "exp", channel_names=["NFkB", "DNA"], segmentation_defaults=defaults or {}
    )
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])
    return entity


def list_images(entity) -> list[Path]:
    return sorted(Path(entity.properties["image_directory"]).glob("*.tif"))


@pytest.fixture
def plate(tmp_path, instance):
    return register_plate(tmp_path / "plate", instance, {"diameter": "12"})


@pytest.mark.parametrize(
    ("typed", "resolved"),
    [
        ({"diameter": 17}, {"diameter": "17"}),
        ({"diameter": 17.5}, {"diameter": "17.5"}),
        ({"diameter": "17"}, {"diameter": "17"}),
        ({"diameter": "None"}, {"diameter": "None"}),  # YAML's None is text: estimate the diameter
        ({"diameter": None}, {"diameter": "12"}),  # null: the experiment's default
        ({"nuclei_channel": "DNA", "cytoplasm_channel": "dna"}, {"nuclei_channel": 2, "cytoplasm_channel": 2}),
        ({"nuclei_channel": 2, "cytoplasm_channel": "2"}, {"nuclei_channel": 2, "cytoplasm_channel": 2}),
        ({"nuclei_channel": "Channel1", "cytoplasm_channel": 1.0}, {"nuclei_channel": 1, "cytoplasm_channel": 1}),
    ],
    ids=["17", "17.5", "'17'", "'None'", "null", "names", "number and text", "label and float"],
)
def test_the_launchpads_forms_pass_dagsters_validation_and_read_as_the_clis(plate, typed, resolved):
    validated = validate_run_config(defs.resolve_job_def("segmentation_job"), run_config(**typed))
    config = SegmentationConfig(**validated["ops"]["segmentation_masks"]["config"])
    expected = PLATFORM_DEFAULTS | {"diameter": "12"} | resolved
    assert config.resolved_for(plate).model_dump() == expected


@pytest.mark.slow
def test_a_run_typed_with_numbers_and_names_records_mantles_canonical_parameters(
    tmp_path, instance, bbbc014_crops, bundled_model_name
):
    defaults = {"cellpose_model": bundled_model_name, "nuclei_channel": 2, "cytoplasm_channel": 2, "diameter": "12"}
    entity = register_image_directory(EntityStore(), bbbc014_crops, "crops", channel_names=["NFkB", "DNA"],
                                      segmentation_defaults=defaults)
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])
    result = defs.resolve_job_def("segmentation_job").execute_in_process(
        run_config=run_config(cellpose_model=bundled_model_name, nuclei_channel="DNA", cytoplasm_channel=2,
                              diameter=12),
        instance=instance,
        partition_key=entity.entity_id,
    )
    store = EntityStore()
    (masks,) = store.list("segmentation_mask_directory")
    assert {name: masks.properties[name] for name in defaults} == defaults
    (edge,) = store.parents(masks.entity_id)
    assert {name: edge.parameters[name] for name in defaults} == defaults
    metadata = result.asset_materializations_for_node("segmentation_masks")[0].metadata
    assert {name: metadata["parameters"].value[name] for name in defaults} == defaults
    # The nightly schedule compares these with the entity's defaults: the typed run's masks are current.
    wanted = default_segmentation_config(store.get(entity.entity_id)).model_dump()
    assert recorded_parameters(masks) == {name: wanted[name] for name in RESULT_PARAMETERS}


def failure_events(instance, run_id):
    """The run's step failure and run failure events, as the run page reads them from the instance."""
    events = [record.dagster_event for record in instance.all_logs(run_id) if record.dagster_event]
    kinds = [event.event_type for event in events]
    assert DagsterEventType.STEP_UP_FOR_RETRY not in kinds
    assert DagsterEventType.STEP_OUTPUT not in kinds
    (step,) = [event for event in events if event.event_type == DagsterEventType.STEP_FAILURE]
    (run,) = [event for event in events if event.event_type == DagsterEventType.RUN_FAILURE]
    return step.step_failure_data, run


REFUSALS = [
    ({"cellpose_model": "cyto9"}, "unknown cellpose_model 'cyto9': use a bundled model ("),
    ({"nuclei_channel": 3, "cytoplasm_channel": 3}, "nuclei_channel=3 but the images have 2 channel(s)"),
    (
        {"nuclei_channel": "DNA", "cytoplasm_channel": "NFkB"},
        "cellpose_model 'mantle-nuclei-v1' segments nuclei in one channel, but cytoplasm_channel=1 differs from "
        "nuclei_channel=2 (a whole-cell request)",
    ),
    (
        {"nuclei_channel": "GFP"},
        "nuclei_channel='GFP' names no channel; the channels are 1 NFkB (Channel1), 2 DNA (Channel2)",
    ),
    ({"cytoplasm_channel": True}, "cytoplasm_channel must be a channel number or name, got True"),
    ({"diameter": "abc"}, "diameter must be a number of pixels or None, got 'abc'"),
    ({"diameter": [17]}, "diameter must be a number of pixels or None, got [17]"),
    ({"diameter": -3}, "diameter must be a positive number of pixels, got '-3'"),
]


@pytest.mark.parametrize(("config", "reason"), REFUSALS, ids=[
    "unknown model", "channel beyond the images", "whole cells from a nuclei model", "unknown channel name",
    "boolean channel", "text diameter", "list diameter", "negative diameter"])
def test_a_request_that_cannot_work_fails_its_run_with_the_reason_before_any_image_is_read(
    plate, instance, config, reason
):
    validate_run_config(defs.resolve_job_def("segmentation_job"), run_config(**config))  # the launchpad lets it by
    for path in list_images(plate):
        path.unlink()
    # A retry policy of the job's: the refusal's Failure(allow_retries=False) bypasses it.
    retried = define_asset_job("retried_segmentation", selection=[segmentation_masks],
                               partitions_def=image_directory_partitions, op_retry_policy=RetryPolicy(max_retries=2))
    job = Definitions(
        assets=[image_directory, segmentation_masks],
        jobs=[retried],
        resources={"entity_store": EntityStoreResource(), "cellpose": CellposeResource()},
    ).resolve_job_def("retried_segmentation")
    result = job.execute_in_process(
        run_config=run_config(**config), instance=instance, partition_key=plate.entity_id, raise_on_error=False
    )
    assert not result.success
    step, run = failure_events(instance, result.run_id)
    description = step.user_failure_data.description
    assert description.startswith(reason) and "\n" not in description
    assert step.error.cls_name == "Failure" and step.error.cause is None
    assert step.error.message == f"dagster._core.definitions.events.Failure: {description}\n"
    assert run.job_failure_data.error.message == step.error.message
    assert EntityStore().list("segmentation_mask_directory") == []


def test_a_range_run_whose_every_directory_is_refused_fails_at_once_naming_each(tmp_path, instance, plate):
    other = register_plate(tmp_path / "other", instance)
    for path in list_images(plate) + list_images(other):
        path.unlink()
    result = defs.resolve_job_def("segmentation_job").execute_in_process(
        run_config=run_config(cellpose_model="cyto9"),
        tags={ASSET_PARTITION_RANGE_START_TAG: plate.entity_id, ASSET_PARTITION_RANGE_END_TAG: other.entity_id},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    step, _ = failure_events(instance, result.run_id)
    unknown = "unknown cellpose_model 'cyto9': use a bundled model"
    description = step.user_failure_data.description
    assert description.startswith(f"all 2 image directories refused: {plate.entity_id}: {unknown}")
    assert f"; {other.entity_id}: {unknown}" in description


def test_measuring_a_directory_without_masks_fails_with_the_reason(plate, instance):
    result = defs.resolve_job_def("measurement_job").execute_in_process(
        instance=instance, partition_key=plate.entity_id, raise_on_error=False
    )
    assert not result.success
    step, _ = failure_events(instance, result.run_id)
    assert step.user_failure_data.description == (
        f"{plate.entity_id} has no segmentation masks: materialise segmentation_masks first"
    )


def test_training_under_an_unusable_model_name_fails_with_the_reason(tmp_path, instance):
    result = defs.resolve_job_def("training_job").execute_in_process(
        run_config={"ops": {"trained_cellpose_model": {"config": {
            "train_directories": [f"a={tmp_path}"], "validation_directory": str(tmp_path), "model_name": "../up"}}}},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    step, _ = failure_events(instance, result.run_id)
    assert step.user_failure_data.description == (
        "model_name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit, got '../up'"
    )
