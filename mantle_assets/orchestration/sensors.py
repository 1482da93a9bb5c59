"""Sensors: new image directories become partitions and get segmented without anyone clicking."""

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from mantle_assets.entities import Entity
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.jobs import segmentation_job
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.resources import EntityStoreResource
from mantle_assets.registration import IMAGE_DIRECTORY


def default_segmentation_config(entity: Entity) -> SegmentationConfig:
    """The entity's own segmentation defaults over the platform's."""
    return SegmentationConfig(**(entity.properties.get("segmentation_defaults") or {}))


def segmentation_run_config(config: SegmentationConfig) -> dict:
    return {"ops": {"segmentation_masks": {"config": config.model_dump()}}}


@sensor(
    job=segmentation_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition for each new image_directory entity and requests its segmentation "
    "with the entity's defaults; archived entities lose their partition.",
)
def new_image_directory_sensor(
    context: SensorEvaluationContext, entity_store: EntityStoreResource
) -> SensorResult:
    active = entity_store.store().list(IMAGE_DIRECTORY)
    partitions = set(context.instance.get_dynamic_partitions(image_directory_partitions.name))
    # The cursor is the newest entity id already handled: ids are zero-padded, so they sort as strings.
    handled_up_to = context.cursor or ""
    new = [e for e in active if e.entity_id > handled_up_to or e.entity_id not in partitions]
    retired = sorted(partitions - {e.entity_id for e in active})
    requests = []
    if new:
        requests.append(image_directory_partitions.build_add_request([e.entity_id for e in new]))
    if retired:
        requests.append(image_directory_partitions.build_delete_request(retired))
    if not requests:
        return SensorResult(skip_reason="no new or archived image directories")
    return SensorResult(
        run_requests=[
            RunRequest(
                # One automatic run per entity, however many ticks see it.
                run_key=f"new-image-directory-{e.entity_id}",
                partition_key=e.entity_id,
                run_config=segmentation_run_config(default_segmentation_config(e)),
            )
            for e in new
        ],
        dynamic_partitions_requests=requests,
        cursor=max([handled_up_to, *(e.entity_id for e in new)]),
    )
