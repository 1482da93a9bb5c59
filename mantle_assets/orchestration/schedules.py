"""The nightly backfill: segment every partition whose masks are missing, failed or stale."""

import itertools
import math

from dagster import (
    AssetPartitionStatus,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    schedule,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from mantle_assets.entities import Entity, EntityStore
from mantle_assets.imaging.fields import ImageDirectoryError
from mantle_assets.models.registry import ModelResolutionError, resolve_model
from mantle_assets.orchestration.assets import current_masks, segmentation_masks
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.instance import automatic_run_tags
from mantle_assets.orchestration.jobs import segmentation_job
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.resources import EntityStoreResource
from mantle_assets.orchestration.sensors import default_segmentation_config, segmentation_run_config
from mantle_assets.registration import IMAGE_DIRECTORY, directory_fingerprint
from mantle_assets.settings import gpu_count, plates_per_run
from mantle_assets.storage import is_directory

# batch_size changes speed and memory, not the masks.
RESULT_PARAMETERS = ("cellpose_model", "nuclei_channel", "cytoplasm_channel", "diameter",
                     "flow_threshold", "cellprob_threshold", "min_size")


def recorded_parameters(masks: Entity) -> dict:
    properties = masks.properties
    return {name: properties.get(name, (properties.get("extra_parameters") or {}).get(name))
            for name in RESULT_PARAMETERS}


def stale_reason(
    store: EntityStore, entity: Entity, failed: bool, model_hashes: dict[str, str | None]
) -> str | None:
    """Why a partition needs segmenting again, or None when its masks are current.

    Compares what the masks entity recorded (parameters, the directory's
    fingerprint, the weights' hash) with what a run would use now; ``failed``:
    Dagster's status of the partition is failed (its last attempt failed).
    """
    config: SegmentationConfig = default_segmentation_config(entity)
    masks = current_masks(store, entity.entity_id)
    if masks is None:
        return "no masks"
    if failed:
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


def batches(stale: dict[str, str], partition_keys: list[str], size: int) -> list[tuple[list[str], str]]:
    """Group stale partitions into runs of at most ``size``.

    A run covers a range of partitions, so a batch is a stretch of stale
    partitions adjacent in ``partition_keys`` (the partitions' order) with the
    same reason; a longer stretch is split into near-equal batches.

    Parameters
    ----------
    stale : dict of str to str
        Stale partition keys and why.
    partition_keys : list of str
        All partition keys, in order.
    size : int
        Most partitions per batch.

    Returns
    -------
    list of (list of str, str)
        Each batch's partition keys, in order, and their reason.
    """
    stretches: list[tuple[list[str], str]] = []
    previous = None
    for key in partition_keys:
        reason = stale.get(key)
        if reason is not None and previous == reason:
            stretches[-1][0].append(key)
        elif reason is not None:
            stretches.append(([key], reason))
        previous = reason
    result = []
    for keys, reason in stretches:
        count = math.ceil(len(keys) / size)
        bounds = [round(i * len(keys) / count) for i in range(count + 1)]
        result += [(keys[start:end], reason) for start, end in itertools.pairwise(bounds)]
    return result


def batch_run_request(keys: list[str], reason: str, entity: Entity, night: str) -> RunRequest:
    """The run for a batch; ``entity`` is its first partition's image directory.

    One partition gets its run config spelled out; a range leaves every
    parameter unset, so each directory is segmented with its own experiment's
    defaults (see :class:`SegmentationConfig`).
    """
    tags = automatic_run_tags() | {"mantle/stale_reason": reason}
    if len(keys) == 1:
        return RunRequest(
            run_key=f"stale-{keys[0]}-{night}",
            partition_key=keys[0],
            run_config=segmentation_run_config(default_segmentation_config(entity)),
            tags=tags,
        )
    return RunRequest(
        run_key=f"stale-{keys[0]}-{keys[-1]}-{night}",
        run_config=segmentation_run_config(SegmentationConfig()),
        tags=tags | {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
    )


@schedule(
    job=segmentation_job,
    cron_schedule="0 2 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Nightly: segments every partition whose masks are missing, failed, or stale (directory "
    "fingerprint, parameters or model weights changed since they were made), up to "
    "`MANTLE_PLATES_PER_RUN` adjacent partitions per run, fewer when that leaves GPUs (`MANTLE_GPUS`) idle.",
)
def stale_segmentation_schedule(context: ScheduleEvaluationContext, entity_store: EntityStoreResource):
    store = entity_store.store()
    partition_keys = image_directory_partitions.get_partition_keys(dynamic_partitions_store=context.instance)
    status = context.instance.get_status_by_partition(
        segmentation_masks.key, partition_keys, image_directory_partitions
    ) or {}
    model_hashes: dict[str, str | None] = {}
    night = context.scheduled_execution_time.strftime("%Y%m%d") if context.scheduled_execution_time else "now"
    entities = {entity.entity_id: entity for entity in store.list(IMAGE_DIRECTORY)}
    stale = {}
    for key in partition_keys:
        entity = entities.get(key)
        if entity is None or not is_directory(entity.properties["image_directory"]):
            continue
        reason = stale_reason(store, entity, status.get(key) == AssetPartitionStatus.FAILED, model_hashes)
        if reason is not None:
            stale[key] = reason
    # Few stale plates are spread over the GPUs rather than queued behind one of them.
    size = min(plates_per_run(), max(1, math.ceil(len(stale) / gpu_count())))
    return [
        batch_run_request(keys, reason, entities[keys[0]], night)
        for keys, reason in batches(stale, partition_keys, size)
    ]
