"""The nightly backfill: segment every partition whose masks are missing, failed or stale."""

from dagster import (
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    schedule,
)

from mantle_assets.entities import Entity, EntityStore
from mantle_assets.imaging.fields import ImageDirectoryError
from mantle_assets.models.registry import ModelResolutionError, resolve_model
from mantle_assets.orchestration.assets import MASK_DIRECTORY, SEGMENTATION_PIPELINE
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.jobs import segmentation_job
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.resources import EntityStoreResource
from mantle_assets.orchestration.sensors import default_segmentation_config, segmentation_run_config
from mantle_assets.registration import IMAGE_DIRECTORY, directory_fingerprint
from mantle_assets.storage import is_directory

# batch_size changes speed and memory, not the masks.
RESULT_PARAMETERS = ("cellpose_model", "nuclei_channel", "cytoplasm_channel", "diameter",
                     "flow_threshold", "cellprob_threshold", "min_size")


def current_output(store: EntityStore, entity_id: str, pipeline: str, data_type: str) -> Entity | None:
    """The unarchived ``data_type`` entity that ``pipeline`` made from ``entity_id`` most recently."""
    for edge in reversed(store.children(entity_id)):
        if edge.pipeline == pipeline:
            child = store.get(edge.child_id)
            if child.data_type == data_type and not child.archived:
                return child
    return None


def current_masks(store: EntityStore, entity_id: str) -> Entity | None:
    return current_output(store, entity_id, SEGMENTATION_PIPELINE, MASK_DIRECTORY)


def recorded_parameters(masks: Entity) -> dict:
    properties = masks.properties
    return {name: properties.get(name, (properties.get("extra_parameters") or {}).get(name))
            for name in RESULT_PARAMETERS}


def stale_reason(store: EntityStore, instance, entity: Entity, model_hashes: dict[str, str | None]) -> str | None:
    """Why a partition needs segmenting again, or None when its masks are current.

    Compares what the masks entity recorded (parameters, the directory's
    fingerprint, the weights' hash) with what a run would use now.
    """
    config: SegmentationConfig = default_segmentation_config(entity)
    masks = current_masks(store, entity.entity_id)
    if masks is None:
        return "no masks"
    last_runs = instance.get_runs(
        filters=RunsFilter(job_name=segmentation_job.name, tags={"dagster/partition": entity.entity_id}), limit=1
    )
    if last_runs and last_runs[0].status == DagsterRunStatus.FAILURE:
        return "last run failed"
    wanted = config.model_dump()
    if recorded_parameters(masks) != {name: wanted[name] for name in RESULT_PARAMETERS}:
        return "parameters changed"
    try:
        _, fingerprint = directory_fingerprint(entity.properties["image_directory"])
    except ImageDirectoryError:
        return None  # a vanished directory cannot be segmented; the run would only fail
    if fingerprint != masks.properties.get("source_fingerprint"):
        return "images changed"
    if config.cellpose_model not in model_hashes:
        try:
            model_hashes[config.cellpose_model] = resolve_model(config.cellpose_model, download=False).weights_sha256()
        except ModelResolutionError:
            model_hashes[config.cellpose_model] = None
    current_model = model_hashes[config.cellpose_model]
    if current_model is not None and current_model != masks.properties.get("model_sha256"):
        return "model changed"
    return None


@schedule(
    job=segmentation_job,
    cron_schedule="0 2 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Nightly: one run per partition whose masks are missing, failed, or stale (directory "
    "fingerprint, parameters or model weights changed since they were made).",
)
def stale_segmentation_schedule(context: ScheduleEvaluationContext, entity_store: EntityStoreResource):
    store = entity_store.store()
    partitions = set(context.instance.get_dynamic_partitions(image_directory_partitions.name))
    model_hashes: dict[str, str | None] = {}
    night = context.scheduled_execution_time.strftime("%Y%m%d") if context.scheduled_execution_time else "now"
    requests = []
    for entity in store.list(IMAGE_DIRECTORY):
        if entity.entity_id not in partitions or not is_directory(entity.properties["image_directory"]):
            continue
        reason = stale_reason(store, context.instance, entity, model_hashes)
        if reason is not None:
            requests.append(
                RunRequest(
                    run_key=f"stale-{entity.entity_id}-{night}",
                    partition_key=entity.entity_id,
                    run_config=segmentation_run_config(default_segmentation_config(entity)),
                    tags={"mantle/stale_reason": reason},
                )
            )
    return requests
