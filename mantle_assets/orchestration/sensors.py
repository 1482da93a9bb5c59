"""Sensors: new image directories become partitions, get segmented and measured without anyone clicking."""

import json
import time

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.event_api import EventLogRecord

from mantle_assets.entities import Entity
from mantle_assets.imaging.fields import ImageDirectoryError
from mantle_assets.inbox import inbox_folders, read_sidecar, scan_folder
from mantle_assets.orchestration.assets import MASK_DIRECTORY, SEGMENTATION_PIPELINE, segmentation_masks
from mantle_assets.orchestration.cells import CELL_PIPELINE, CellConfig, cell_masks, grown_from
from mantle_assets.orchestration.config import NO_CELLS, PLATFORM_DEFAULTS, SegmentationConfig
from mantle_assets.orchestration.instance import automatic_run_tags
from mantle_assets.orchestration.jobs import (
    cell_job,
    cell_run_config,
    measurement_job,
    segmentation_job,
    segmentation_run_config,
)
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


def new_materializations(
    context: SensorEvaluationContext, asset_keys: dict[str, AssetKey]
) -> tuple[dict[str, dict[str, EventLogRecord]], str]:
    """Each asset's materializations since the cursor, the newest per partition, and the cursor after them.

    The cursor holds a position per asset (``asset_keys``' names); a bare number, as a sensor with one asset
    wrote it, is that position for every asset (storage ids are the event log's, so that reads nothing twice).
    """
    stored = context.cursor or "{}"
    positions = json.loads(stored) if stored.startswith("{") else dict.fromkeys(asset_keys, int(stored))
    latest = {}
    for name, key in asset_keys.items():
        after = AssetRecordsFilter(asset_key=key, after_storage_id=positions.get(name))
        records = context.instance.fetch_materializations(after, limit=EVENTS_PER_TICK, ascending=True).records
        latest[name] = {record.partition_key: record for record in records}  # ascending: the newest wins
        if records:
            positions[name] = records[-1].storage_id
    return latest, json.dumps(positions, sort_keys=True)


def cell_method(entity: Entity) -> str | None:
    """The cell method the plate's defaults ask the automation for (``cell_method``), None for no cells."""
    method = (entity.properties.get("segmentation_defaults") or {}).get("cell_method", PLATFORM_DEFAULTS["cell_method"])
    return None if method == NO_CELLS else method


@sensor(
    job=measurement_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Measures every image directory whose segmentation_masks or cell_masks were materialized (by any "
    "run: the sensors', the nightly schedules', a backfill's, the UI's, the CLI's) and whose masks no cell "
    "measurement table measured yet, or measured before the cells grown from them (cytoplasm: ring, then cell): "
    "one measurement_job run per directory. A plate whose defaults ask for cells (cell_method) is measured once "
    "its cells are grown, not on its nuclei alone.",
)
def segmented_directory_sensor(
    context: SensorEvaluationContext, entity_store: EntityStoreResource
) -> SensorResult:
    latest, cursor = new_materializations(context, {"nuclei": segmentation_masks.key, "cells": cell_masks.key})
    if not latest["nuclei"] and not latest["cells"]:
        return SensorResult(skip_reason="no new segmentation or cell masks")
    partitions = set(context.instance.get_dynamic_partitions(image_directory_partitions.name))
    store = entity_store.store()
    with store.session():
        nuclei_ids = [entity_id_of(key) for key in latest["nuclei"] if key in partitions]
        # Nuclei of a plate that asks for cells wait for them: the cells' materialization asks for the measuring.
        asking = {e.entity_id for e in store.list(IMAGE_DIRECTORY, entity_ids=nuclei_ids) if cell_method(e)}
        candidates = {
            **{key: record for key, record in latest["nuclei"].items() if entity_id_of(key) not in asking},
            **latest["cells"],
        }
        unmeasured = needs_measuring(store, [entity_id_of(key) for key in candidates if key in partitions])
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=f"measure-{entity_id_of(key)}-{record.storage_id}", partition_key=key,
                tags=automatic_run_tags(),
            )
            for key, record in candidates.items()
            if entity_id_of(key) in unmeasured
        ],
        cursor=cursor,
    )


@sensor(
    job=cell_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Grows whole cells around new segmentation_masks (materialized by any run) of every image directory "
    "whose defaults ask for cells (cell_method: propagate or cellpose) and whose current cells were not grown from "
    "those nuclei: one cell_job run per directory, with that method and the platform's other cell parameters.",
)
def segmented_nuclei_cell_sensor(context: SensorEvaluationContext, entity_store: EntityStoreResource) -> SensorResult:
    latest, cursor = new_materializations(context, {"nuclei": segmentation_masks.key})
    if not latest["nuclei"]:
        return SensorResult(skip_reason="no new segmentation masks")
    partitions = set(context.instance.get_dynamic_partitions(image_directory_partitions.name))
    keys = {entity_id_of(key): key for key in latest["nuclei"] if key in partitions}
    store = entity_store.store()
    with store.session():
        methods = {e.entity_id: cell_method(e) for e in store.list(IMAGE_DIRECTORY, entity_ids=list(keys))}
        asking = [entity_id for entity_id, method in methods.items() if method]
        nuclei = store.current_outputs(SEGMENTATION_PIPELINE, MASK_DIRECTORY, asking)
        cells = store.current_outputs(CELL_PIPELINE, MASK_DIRECTORY, list(nuclei))
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=f"cells-{entity_id}-{latest['nuclei'][keys[entity_id]].storage_id}",
                partition_key=keys[entity_id],
                run_config=cell_run_config(CellConfig(method=methods[entity_id])),
                tags=automatic_run_tags(),
            )
            for entity_id, current in nuclei.items()
            if not grown_from(cells.get(entity_id), current)
        ],
        cursor=cursor,
    )
