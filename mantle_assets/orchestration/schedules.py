"""The nightly backfill: segment every partition whose masks are missing, failed or stale.

An hour before it, the image directories are observed (fingerprinted) in a run of their own, so that the
backfill's tick reads recorded data versions instead of listing every plate. Half an hour after it, the
cells of plates that ask for them (``cell_method``) are grown again where missing, failed or stale.
"""

import itertools
import math
from collections.abc import Callable

from dagster import (
    AssetPartitionStatus,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    schedule,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from mantle_assets.entities import Entity
from mantle_assets.imaging.fields import ImageDirectoryError
from mantle_assets.models.registry import ModelResolutionError, resolve_model
from mantle_assets.orchestration.assets import (
    MASK_DIRECTORY,
    MISSING_IMAGES,
    SEGMENTATION_PIPELINE,
    image_directory,
    segmentation_masks,
    version_has_fingerprint,
)
from mantle_assets.orchestration.cells import CELL_PIPELINE, CellConfig, cell_masks, grown_from
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.instance import automatic_run_tags
from mantle_assets.orchestration.jobs import cell_job, cell_run_config, observe_image_directories_job, segmentation_job
from mantle_assets.orchestration.partitions import entity_id_of, image_directory_partitions
from mantle_assets.orchestration.resources import EntityStoreResource
from mantle_assets.orchestration.sensors import (
    cell_method,
    default_segmentation_config,
    run_defaults,
    segmentation_run_config,
)
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


def observed_images(instance: DagsterInstance) -> tuple[dict[str, str], float | None]:
    """The image_directory data versions last observed, per partition, and when they were taken.

    Two indexed queries, whatever the length of the event log: the latest
    successful observation run (which observes every directory registered when
    it starts) and the latest data version tag of each partition.

    Returns
    -------
    (dict of str to str, float or None)
        Data version per partition, and the POSIX start time of the latest
        successful ``observe_image_directories_job`` run (None if there was none,
        and then no version is returned).
    """
    runs = instance.get_run_records(
        RunsFilter(job_name=observe_image_directories_job.name, statuses=[DagsterRunStatus.SUCCESS]), limit=1
    )
    if not runs or runs[0].start_time is None:
        return {}, None
    tags = instance.event_log_storage.get_latest_tags_by_partition(
        image_directory.key, DagsterEventType.ASSET_OBSERVATION, [DATA_VERSION_TAG]
    )
    return {partition: values[DATA_VERSION_TAG] for partition, values in tags.items()}, runs[0].start_time


def images_check(
    entity: Entity, masks: Entity | None, version: str | None, observed_at: float | None
) -> Callable[[str | None], bool | None] | None:
    """How the tick tells whether a directory still holds the images some masks were made from.

    The last observation (see :func:`observed_images`) answers when its run
    started after the entity's last change and its masks were made:
    fingerprinting every plate is the observation job's work, not the tick's.
    Otherwise (a plate registered, changed or segmented since) the directory
    is looked at now.

    Returns
    -------
    callable or None
        None when the directory is gone (nothing to segment); else a check
        taking the masks' ``source_fingerprint`` and answering whether the
        images are unchanged, or None when they cannot be read now.
    """
    changed_at = max(entity.updated_at, masks.updated_at) if masks is not None else entity.updated_at
    if version is not None and observed_at is not None and observed_at > changed_at.timestamp():
        if version == MISSING_IMAGES:
            return None
        return lambda fingerprint: version_has_fingerprint(version, fingerprint)
    directory = entity.properties["image_directory"]
    if not is_directory(directory):
        return None

    def fingerprint_now(fingerprint: str | None) -> bool | None:
        try:
            return directory_fingerprint(directory)[1] == fingerprint
        except ImageDirectoryError:
            return None

    return fingerprint_now


def stale_reason(
    entity: Entity,
    masks: Entity | None,
    failed: bool,
    images_unchanged: Callable[[str | None], bool | None],
    model_hashes: dict[str, str | None],
    configs: dict[str, SegmentationConfig],
) -> str | None:
    """Why a partition needs segmenting again, or None when its masks are current.

    Compares what the masks entity (the partition's current masks, None when
    it has none) recorded (parameters, the directory's fingerprint, the
    weights' hash) with what a run would use now; ``failed``: Dagster's status
    of the partition is failed (its last attempt failed); ``images_unchanged``:
    see :func:`images_check`; ``model_hashes`` and ``configs`` are the tick's caches.
    """
    if masks is None:
        return "no masks"
    if failed:
        return "last run failed"
    config = run_defaults(entity, configs)
    wanted = config.model_dump()
    if recorded_parameters(masks) != {name: wanted[name] for name in RESULT_PARAMETERS}:
        return "parameters changed"
    unchanged = images_unchanged(masks.properties.get("source_fingerprint"))
    if unchanged is None:
        return None  # a vanished directory cannot be segmented; the run would only fail
    if not unchanged:
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
    versions, observed_at = observed_images(context.instance)
    model_hashes: dict[str, str | None] = {}
    configs: dict[str, SegmentationConfig] = {}
    night = context.scheduled_execution_time.strftime("%Y%m%d") if context.scheduled_execution_time else "now"
    with store.session():
        entities = {entity.entity_id: entity for entity in store.list(IMAGE_DIRECTORY)}
        masks = store.current_outputs(SEGMENTATION_PIPELINE, MASK_DIRECTORY)
    stale = {}
    for key in partition_keys:
        entity = entities.get(entity_id_of(key))
        if entity is None:
            continue
        current = masks.get(entity.entity_id)
        images_unchanged = images_check(entity, current, versions.get(key), observed_at)
        if images_unchanged is None:
            continue
        failed = status.get(key) == AssetPartitionStatus.FAILED
        reason = stale_reason(entity, current, failed, images_unchanged, model_hashes, configs)
        if reason is not None:
            stale[key] = reason
    # Few stale plates are spread over the GPUs rather than queued behind one of them.
    size = min(plates_per_run(), max(1, math.ceil(len(stale) / gpu_count())))
    return [
        batch_run_request(keys, reason, entities[entity_id_of(keys[0])], night)
        for keys, reason in batches(stale, partition_keys, size)
    ]


def stale_cell_reason(entity: Entity, nuclei: Entity | None, cells: Entity | None, failed: bool) -> str | None:
    """Why a partition needs its cells grown again, or None when they are current or the plate asks for none.

    A plate asks for cells with its ``cell_method`` default; its cells are compared with its current nuclei
    masks (``nuclei``; None: there is nothing to grow them from) and with the cell parameters a run would use
    now (that method, the platform's other parameters). ``failed``: Dagster's status of the partition of
    ``cell_masks`` is failed.
    """
    method = cell_method(entity)
    if method is None or nuclei is None:
        return None
    if cells is None:
        return "no cells"
    if failed:
        return "last run failed"
    if not grown_from(cells, nuclei):
        return "nuclei segmented again"
    if cells.properties.get("cell_parameters") != CellConfig(method=method).parameters():
        return "cell parameters changed"
    return None


@schedule(
    job=cell_job,
    cron_schedule="30 2 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Nightly, half an hour after the stale-segmentation backfill: grows the cells of every partition "
    "whose plate asks for cells (cell_method) and whose cells are missing, failed, grown from nuclei segmented "
    "again since, or made with other cell parameters than its defaults'; one cell_job run per partition. "
    "Partitions being segmented are left to the cell sensor, which grows their cells once their nuclei land.",
)
def stale_cell_schedule(context: ScheduleEvaluationContext, entity_store: EntityStoreResource) -> list[RunRequest]:
    store = entity_store.store()
    partition_keys = image_directory_partitions.get_partition_keys(dynamic_partitions_store=context.instance)
    cell_status = context.instance.get_status_by_partition(
        cell_masks.key, partition_keys, image_directory_partitions
    ) or {}
    nuclei_status = context.instance.get_status_by_partition(
        segmentation_masks.key, partition_keys, image_directory_partitions
    ) or {}
    night = context.scheduled_execution_time.strftime("%Y%m%d") if context.scheduled_execution_time else "now"
    with store.session():
        entities = {entity.entity_id: entity for entity in store.list(IMAGE_DIRECTORY)}
        nuclei = store.current_outputs(SEGMENTATION_PIPELINE, MASK_DIRECTORY)
        cells = store.current_outputs(CELL_PIPELINE, MASK_DIRECTORY)
    requests = []
    for key in partition_keys:
        entity = entities.get(entity_id_of(key))
        if entity is None or nuclei_status.get(key) == AssetPartitionStatus.IN_PROGRESS:
            continue
        failed = cell_status.get(key) == AssetPartitionStatus.FAILED
        reason = stale_cell_reason(entity, nuclei.get(entity.entity_id), cells.get(entity.entity_id), failed)
        if reason is not None:
            requests.append(RunRequest(
                run_key=f"stale-cells-{key}-{night}",
                partition_key=key,
                run_config=cell_run_config(CellConfig(method=cell_method(entity))),
                tags=automatic_run_tags() | {"mantle/stale_reason": reason},
            ))
    return requests


@schedule(
    job=observe_image_directories_job,
    cron_schedule="0 1 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Nightly, an hour before the stale-segmentation backfill: records each image directory's file "
    "count and fingerprint (its data version), which the backfill's tick compares with its masks'.",
)
def image_directory_observation_schedule(context: ScheduleEvaluationContext) -> RunRequest:
    night = context.scheduled_execution_time.strftime("%Y%m%d") if context.scheduled_execution_time else "now"
    return RunRequest(run_key=f"observe-image-directories-{night}", tags=automatic_run_tags())
