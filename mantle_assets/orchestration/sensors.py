"""Sensors: new image directories become partitions, get segmented and measured without anyone clicking."""

import json
import time

from dagster import (
    AssetRecordsFilter,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from mantle_assets.entities import Entity
from mantle_assets.imaging.fields import ImageDirectoryError
from mantle_assets.inbox import inbox_folders, read_sidecar, scan_folder
from mantle_assets.orchestration.assets import SEGMENTATION_PIPELINE, segmentation_masks
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.instance import automatic_run_tags
from mantle_assets.orchestration.jobs import measurement_job, segmentation_job, segmentation_run_config
from mantle_assets.orchestration.measurements import needs_measuring
from mantle_assets.orchestration.partitions import (
    entity_id_of,
    image_directory_partitions,
    keys_by_entity_id,
    partition_key,
)
from mantle_assets.orchestration.resources import EntityStoreResource, InboxResource
from mantle_assets.registration import IMAGE_DIRECTORY, register_image_directory, registered_directories


def default_segmentation_config(entity: Entity) -> SegmentationConfig:
    """The entity's own segmentation defaults over the platform's, every parameter set."""
    return SegmentationConfig().resolved_for(entity)


def run_defaults(entity: Entity, configs: dict[str, SegmentationConfig]) -> SegmentationConfig:
    """:func:`default_segmentation_config`, resolved once per tick for all plates sharing what it reads.

    ``configs`` is the tick's cache, keyed by those properties: the experiment's defaults and the channels.
    """
    key = json.dumps(
        [entity.properties.get(name) for name in ("segmentation_defaults", "channel_names")]
        + [(entity.properties.get("field_grouping") or {}).get("channel_labels")],
        sort_keys=True,
        default=str,
    )
    if key not in configs:
        configs[key] = default_segmentation_config(entity)
    return configs[key]


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
    store = entity_store.store()
    partitions = keys_by_entity_id(context.instance.get_dynamic_partitions(image_directory_partitions.name))
    # The cursor is the newest entity id already handled: ids are zero-padded, so they sort as strings.
    handled_up_to = context.cursor or ""
    # Ids only for all of them; properties and lineage only for the new ones.
    with store.session():
        active = store.entity_ids(IMAGE_DIRECTORY)
        new_ids = [entity_id for entity_id in active if entity_id > handled_up_to or entity_id not in partitions]
        new = store.list(IMAGE_DIRECTORY, entity_ids=new_ids) if new_ids else []
        children = store.children_of(new_ids) if new_ids else {}
    still_active = set(active)
    retired = sorted(key for entity_id, key in partitions.items() if entity_id not in still_active)
    # A partition of an entity registered before keys carried names keeps its bare-id key.
    keys = {e.entity_id: partitions.get(e.entity_id) or partition_key(e) for e in new}
    requests = []
    if missing := [key for entity_id, key in keys.items() if entity_id not in partitions]:
        requests.append(image_directory_partitions.build_add_request(missing))
    if retired:
        requests.append(image_directory_partitions.build_delete_request(retired))
    if not new and not retired:
        return SensorResult(skip_reason="no new or archived image directories")
    configs: dict[str, SegmentationConfig] = {}
    return SensorResult(
        run_requests=[
            RunRequest(
                # One automatic run per entity, however many ticks see it.
                run_key=f"new-image-directory-{e.entity_id}",
                partition_key=keys[e.entity_id],
                run_config=segmentation_run_config(run_defaults(e, configs)),
                tags=automatic_run_tags(),
            )
            for e in new
            # Already segmented by hand (e.g. `mantle segment` before the daemon ran): nothing to do.
            if not any(edge.pipeline == SEGMENTATION_PIPELINE for edge in children.get(e.entity_id, ()))
        ],
        dynamic_partitions_requests=requests,
        cursor=max([handled_up_to, *(e.entity_id for e in new)]),
    )


@sensor(
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers each new sub-folder of the inbox ($MANTLE_INBOX) as an image_directory entity "
    "once its files have stopped changing; experiment name and segmentation defaults come from an "
    "experiment.yaml/.json sidecar, else the folder name.",
)
def inbox_sensor(
    context: SensorEvaluationContext, entity_store: EntityStoreResource, inbox: InboxResource
) -> SensorResult:
    root = inbox.path()
    if root is None or not root.is_dir():
        return SensorResult(skip_reason=f"no inbox folder ({root or 'MANTLE_INBOX is not set'})")
    store = entity_store.store()
    folders = inbox_folders(root)
    # Archived ones count too: archiving an inbox plate retires it, it does not ask for it to be registered anew.
    registered = registered_directories(store, folders, include_archived=True)
    # Folders that failed, by signature: reported once, retried only after they change.
    failed: dict[str, str] = json.loads(context.cursor or "{}")
    now, added, refused = time.time(), [], []
    for path in folders:
        if path in registered:
            continue  # not scanned: a registered plate may stay in the inbox with thousands of files
        folder = scan_folder(path)
        key = str(path.resolve())
        if failed.get(key) == folder.signature or now - folder.last_change < inbox.quiet_seconds:
            continue
        try:
            sidecar = read_sidecar(path)
            entity = register_image_directory(
                store,
                path,
                sidecar.pop("experiment_name", None) or path.name,
                **sidecar,
            )
        except (ImageDirectoryError, ValueError) as error:
            reason = str(error).splitlines()[0]
            context.log.warning(f"inbox folder not registered: {reason}")
            refused.append(reason)
            failed[key] = folder.signature
            continue
        failed.pop(key, None)
        added.append(entity.entity_id)
        context.log.info(f"registered {path} as {entity.entity_id}")
    # A refusal is logged and, when nothing was registered, shown as the tick's reason in the UI.
    skip_reason = f"not registered: {'; '.join(refused)}" if refused else "no new quiet inbox folders"
    return SensorResult(cursor=json.dumps(failed, sort_keys=True), skip_reason=None if added else skip_reason)


# Materialization events read per tick; the cursor carries on from the last one.
EVENTS_PER_TICK = 200


@sensor(
    job=measurement_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Measures every image directory whose segmentation_masks were materialized (by any run: "
    "the new-directory sensor's, the nightly schedule's, a backfill's, the UI's, the CLI's) and whose masks "
    "no cell measurement table measured yet: one measurement_job run per directory.",
)
def segmented_directory_sensor(
    context: SensorEvaluationContext, entity_store: EntityStoreResource
) -> SensorResult:
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=segmentation_masks.key, after_storage_id=after),
        limit=EVENTS_PER_TICK,
        ascending=True,
    ).records
    if not records:
        return SensorResult(skip_reason="no new segmentation masks")
    partitions = set(context.instance.get_dynamic_partitions(image_directory_partitions.name))
    latest = {record.partition_key: record for record in records}  # ascending: the newest wins
    unmeasured = needs_measuring(entity_store.store(), [entity_id_of(key) for key in latest if key in partitions])
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=f"measure-{entity_id_of(key)}-{record.storage_id}", partition_key=key,
                tags=automatic_run_tags(),
            )
            for key, record in latest.items()
            if entity_id_of(key) in unmeasured
        ],
        cursor=str(records[-1].storage_id),
    )
