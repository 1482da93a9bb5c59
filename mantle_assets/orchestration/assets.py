"""Assets: registered image directories and their Cellpose segmentation masks."""

import contextlib
import os
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetMaterialization,
    AssetRecordsFilter,
    BackfillPolicy,
    DataVersion,
    DataVersionsByPartition,
    MetadataValue,
    OpExecutionContext,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
    observable_source_asset,
)
from tqdm import tqdm

from mantle_assets.atomic import PARTIAL_PREFIX, output_directory, removed_on_failure
from mantle_assets.entities import Entity, EntityStore, StoreBusyError, StoreUnusableError
from mantle_assets.imaging.fields import MASK_SUFFIX, FieldGrouping, ImageDirectoryError, group_fields
from mantle_assets.imaging.pipeline import DirectorySegmentation, segment_directory
from mantle_assets.imaging.segmentation import check_channels
from mantle_assets.models.registry import (
    ModelResolutionError,
    ModelSpec,
    builtin_model_names,
    builtin_spec,
    resolve_model,
)
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.partitions import image_directory_partitions, keys_by_entity_id, partition_key
from mantle_assets.orchestration.recovery import RunEndedError, check_run_not_ended
from mantle_assets.orchestration.resources import CellposeResource, EntityStoreResource
from mantle_assets.orchestration.retries import REFUSALS, refusals_as_failures, retried_while_store_busy
from mantle_assets.registration import IMAGE_DIRECTORY, check_image_files, directory_fingerprint
from mantle_assets.settings import (
    OutsideDataRootsError,
    check_data_path,
    mantle_home,
    mask_root,
    max_field_pixels,
    max_image_bytes,
    plates_per_run,
    staging_root,
)
from mantle_assets.storage import is_uri, local_copy
from mantle_assets.webserver import PREVIEW_URL

SEGMENTATION_PIPELINE = "cellpose-segmentation"
MASK_DIRECTORY = "segmentation_mask_directory"

# Celery queue of the GPU steps under mantle_assets.celery: only the GPU machines' workers listen to it.
GPU_QUEUE = "gpu"
# Tags of the GPU step: a marker for people and tooling, the pod resources a Kubernetes
# executor requests for it, the queue a Celery executor sends it to, and (via ``pool``)
# the run queue's gpu limit.
GPU_OP_TAGS = {
    "mantle/gpu": "true",
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
    },
    "dagster-celery/queue": GPU_QUEUE,
}


# The data version of an image_directory partition whose directory could not be read.
MISSING_IMAGES = "missing"


def image_directory_version(directory: str) -> DataVersion:
    file_count, fingerprint = directory_fingerprint(directory)
    return DataVersion(f"{file_count} files, sha256 {fingerprint[:16]}")


def version_has_fingerprint(version: str, fingerprint: str | None) -> bool:
    """Whether an image_directory data version (see :func:`image_directory_version`) records this fingerprint."""
    return fingerprint is not None and version.endswith(f"sha256 {fingerprint[:16]}")


@observable_source_asset(
    name=IMAGE_DIRECTORY,
    partitions_def=image_directory_partitions,
    group_name="images",
    description="Directories of microscopy images registered as image_directory entities "
    "(partition key = entity id, experiment / name: type part of a name into the Partitions filter to "
    "find a plate). Observing records each directory's file count and fingerprint.",
    tags={"dagster/kind/tiff": "", "dagster/kind/duckdb": ""},
)
def image_directory(context: OpExecutionContext, entity_store: EntityStoreResource) -> DataVersionsByPartition:
    keys = keys_by_entity_id(context.instance.get_dynamic_partitions(image_directory_partitions.name))
    versions = {}
    for entity in entity_store.store().list(IMAGE_DIRECTORY):
        key = keys.get(entity.entity_id) or partition_key(entity)
        try:
            versions[key] = image_directory_version(entity.properties["image_directory"])
        except (OSError, ImageDirectoryError):
            versions[key] = DataVersion(MISSING_IMAGES)
    return DataVersionsByPartition(versions)


def image_directory_entity(store: EntityStore, entity_id: str) -> Entity:
    """The entity, failing with a one-line message when it is not an image directory."""
    entity = store.get(entity_id)
    if entity.data_type != IMAGE_DIRECTORY:
        raise ValueError(f"{entity_id} is a {entity.data_type}, not an {IMAGE_DIRECTORY}")
    return entity


@contextlib.contextmanager
def staged_image_directory(source: Entity, prefix: str = "") -> Iterator[tuple[FieldGrouping, str]]:
    """An image directory's field grouping and fingerprint, for the time of the block.

    A URI directory is grouped on a local copy under ``$MANTLE_HOME/staging``
    (see :func:`~mantle_assets.storage.local_copy`; ``prefix`` starts its
    name), removed when the block ends. The fingerprint is taken before the
    images are read: images changed meanwhile make the outputs stale, never
    wrongly current. The names are read with the naming pattern given at
    registration, if any. The directory and its files are checked against the
    data roots again, before any file is read: a file replaced by a symbolic
    link out of the roots since registration is refused.

    Raises
    ------
    OutsideDataRootsError
        One line naming the entity and the directory or file outside the data
        roots (see :func:`~mantle_assets.settings.check_data_path`).
    ImageDirectoryError
        One line naming the entity and the directory or file; also when the
        names no longer read with the naming scheme found at registration
        (files were added or renamed since).
    """
    directory = source.properties["image_directory"]
    registered = source.properties.get("field_grouping") or {}
    with contextlib.ExitStack() as stack:
        try:
            check_data_path(directory, "image_directory")
            _, fingerprint = directory_fingerprint(directory)
            images = stack.enter_context(local_copy(directory, staging_root(), prefix))
            if not is_uri(directory):  # a copy's files are the platform's own downloads
                check_image_files(images)
            grouping = group_fields(
                images,
                naming_pattern=registered.get("naming_pattern"),
                max_pixels=max_field_pixels(),
                max_bytes=max_image_bytes(),
            )
        except ImageDirectoryError as error:
            raise ImageDirectoryError(f"{source.entity_id}: {error}") from None
        except OutsideDataRootsError as error:
            raise OutsideDataRootsError(f"{source.entity_id}: {error}") from None
        if registered.get("scheme") not in (None, grouping.scheme):
            raise ImageDirectoryError(
                f"{source.entity_id}: {directory} was registered with naming scheme {registered['scheme']} but its "
                f"files now read as {grouping.scheme}; register it again (mantle register --again)"
            )
        yield grouping, fingerprint


# A model name or file to its weights (see check_segmentation).
ModelResolver = Callable[[str], ModelSpec]


def check_segmentation(
    source: Entity, config: SegmentationConfig, n_channels: int | None, resolve: ModelResolver = resolve_model
):
    """Check a segmentation request's parameters and model against an image directory's channels.

    Parameters
    ----------
    source : Entity
        The image_directory entity: its channel names and segmentation defaults.
    config : SegmentationConfig
        The request; unset parameters are the entity's defaults.
    n_channels : int or None
        The channels of its fields: as grouped from the images, or as recorded at registration
        (``field_grouping.n_channels``) to check before any image is read; None checks no range.
    resolve : callable
        Finds the model by name: :func:`~mantle_assets.models.registry.resolve_model`, or, where no
        download may start (the run queue), :func:`resolve_model_without_download`.

    Returns
    -------
    (SegmentationSettings, ModelSpec)

    Raises
    ------
    ValueError
        A one-line message naming the parameter at fault, or the model (one it cannot find, or a
        nuclei-only model asked for whole cells).
    """
    config = config.resolved_for(source)
    settings = config.settings()
    check_channels(config.nuclei_channel, config.cytoplasm_channel, n_channels)
    spec = resolve(config.cellpose_model)
    spec.check_channels(config.nuclei_channel, config.cytoplasm_channel)
    return settings, spec


def resolve_model_without_download(name_or_path: str) -> ModelSpec:
    """:func:`~mantle_assets.models.registry.resolve_model`, taking a Cellpose built-in that is not cached yet as found.

    For checks made where a download must not start (the webserver's or the daemon's run queue): the run's
    step downloads it, or refuses it in its first second when it cannot.
    """
    try:
        return resolve_model(name_or_path, download=False)
    except ModelResolutionError:
        if name_or_path.strip() in builtin_model_names():
            return builtin_spec(name_or_path.strip())
        raise


def prepare_segmentation(store: EntityStore, entity_id: str, config: SegmentationConfig):
    """Check a segmentation request before any work: the entity, its images, the parameters, the model.

    A URI directory is checked on a local copy that is removed before this
    returns, so the grouping's files are gone then: it serves for checking.

    Returns
    -------
    (Entity, FieldGrouping, SegmentationSettings, ModelSpec)

    Raises
    ------
    ValueError
        A one-line message naming the entity, file or parameter at fault.
    """
    source = image_directory_entity(store, entity_id)
    with staged_image_directory(source) as (grouping, _):
        return (source, grouping, *check_segmentation(source, config, grouping.n_channels))


def refused_requests(
    store: EntityStore, entity_ids: list[str], config: SegmentationConfig, resolve: ModelResolver = resolve_model
) -> dict[str, Exception]:
    """The image directories of a run whose request cannot work, found reading no image and building no network.

    A run checks what it is asked for every directory in its first second, before any is staged or
    segmented: the entity, the parameters (resolved for each directory, whose channel names and
    defaults may differ) and the model. Channels are checked against those recorded at registration;
    each directory is checked again once its images are grouped (:func:`check_segmentation`). The run
    queue makes the same check before it queues the run (:mod:`mantle_assets.orchestration.coordinator`),
    with ``resolve`` that starts no download.

    Returns
    -------
    dict of str to Exception
        Each refused directory's refusal, one line naming the entity, parameter or model; the run
        segments the other directories and then fails, naming these.

    Raises
    ------
    ValueError
        When every directory is refused, so the run can do nothing: the refusal itself for one
        directory, else each directory with its reason, in one line.
    """
    refused = {}
    for entity_id in entity_ids:
        try:
            source = image_directory_entity(store, entity_id)
            recorded = (source.properties.get("field_grouping") or {}).get("n_channels")
            check_segmentation(source, config, recorded, resolve)
        except REFUSALS as error:
            refused[entity_id] = error
    if len(refused) == len(entity_ids) == 1:
        raise ValueError(str(next(iter(refused.values()))).splitlines()[0])
    if refused and len(refused) == len(entity_ids):
        raise ValueError(
            f"all {len(refused)} image directories refused: "
            + "; ".join(f"{entity_id}: {str(error).splitlines()[0]}" for entity_id, error in refused.items())
        )
    return refused


def lineage_table(store: EntityStore, entity_id: str) -> MetadataValue:
    """The entity's parents and children as a table for the asset's metadata panel."""
    edges = [("parent", e) for e in store.parents(entity_id)] + [("child", e) for e in store.children(entity_id)]
    return MetadataValue.table(
        records=[
            TableRecord(
                {
                    "relation": relation,
                    "entity": edge.parent_id if relation == "parent" else edge.child_id,
                    "pipeline": edge.pipeline,
                    "run_id": edge.run_id,
                    "created_at": edge.created_at.isoformat(timespec="seconds"),
                }
            )
            for relation, edge in edges
        ],
        schema=TableSchema(
            columns=[
                TableColumn(name, "string") for name in ("relation", "entity", "pipeline", "run_id", "created_at")
            ]
        ),
    )


def without_file_lists(properties: dict) -> dict:
    """An image directory's properties minus the per-field file lists and wells, which can run to thousands."""
    grouping = properties.get("field_grouping") or {}
    return properties | {"field_grouping": {k: v for k, v in grouping.items() if k not in ("fields", "wells")}}


def summary_metadata(values: list[int]) -> dict:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }


def current_output(store: EntityStore, entity_id: str, pipeline: str, data_type: str) -> Entity | None:
    """The unarchived ``data_type`` entity that ``pipeline`` made from ``entity_id`` most recently."""
    return store.current_outputs(pipeline, data_type, [entity_id]).get(entity_id)


def current_masks(store: EntityStore, entity_id: str) -> Entity | None:
    return current_output(store, entity_id, SEGMENTATION_PIPELINE, MASK_DIRECTORY)


def materialized_in_run(context: AssetExecutionContext, partition_key: str) -> bool:
    latest = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[partition_key]), limit=1
    ).records
    return bool(latest) and latest[0].run_id == context.run.run_id


class NoObjectsError(RuntimeError):
    """A segmentation found no object in any field; such masks are refused, not recorded."""


class SegmentationBatchError(RuntimeError):
    """Some image directories of a multi-partition run failed; the others were segmented and recorded."""


def raise_failures(failures: dict[str, Exception], partitions: int) -> None:
    """Fail the step for the partitions that failed, if any.

    A busy entity store comes first: the step is retried (see
    :func:`retried_while_store_busy`), and the retry skips what is done. A
    single-partition run fails with its partition's own message.
    """
    if not failures:
        return
    busy = [error for error in failures.values() if isinstance(error, StoreBusyError)]
    if busy:
        raise busy[0]
    if partitions == 1:
        raise next(iter(failures.values()))
    raise SegmentationBatchError(
        f"{len(failures)} of {partitions} image directories failed: "
        + "; ".join(f"{entity_id}: {error}" for entity_id, error in failures.items())
    )


@asset(
    deps=[image_directory],
    partitions_def=image_directory_partitions,
    group_name="segmentation",
    kinds={"cellpose", "pytorch", "duckdb"},
    owners=["team:imaging"],
    op_tags=GPU_OP_TAGS,
    pool="gpu",
    # A backfill segments several directories per run: one process, pod and model load for
    # all of them, rather than one per plate.
    backfill_policy=BackfillPolicy.multi_run(plates_per_run()),
    output_required=False,
    description="Cellpose label images, one `<field>_cp_masks.tif` per field, recorded as a "
    "segmentation_mask_directory entity linked to its image_directory. A backfill segments up to "
    "`MANTLE_PLATES_PER_RUN` (default 8) directories per run; each is materialized as soon as its "
    "entity is recorded, so one bad directory does not undo the others.",
)
def segmentation_masks(
    context: AssetExecutionContext,
    config: SegmentationConfig,
    entity_store: EntityStoreResource,
    cellpose: CellposeResource,
) -> Iterator[AssetMaterialization]:
    store = entity_store.store()
    # A request that cannot work for any directory fails the run at once, its reason the run's error, and no
    # retry repeats it; directories refused among others are not staged, and are named when the run fails.
    with retried_while_store_busy(seconds_to_wait=entity_store.lock_timeout), refusals_as_failures():
        keys = keys_by_entity_id(context.partition_keys)
        failures = refused_requests(store, list(keys), config)
    for entity_id, key in keys.items():
        if entity_id in failures or materialized_in_run(context, key):
            continue  # refused, or materialised by an earlier attempt of this step, which a retry repeats
        try:
            metadata = segment_partition(context, entity_id, config, store, cellpose)
        except (StoreUnusableError, RunEndedError):
            raise  # no directory of the batch could be recorded: stop before segmenting the others
        except Exception as error:  # the batch goes on; the step fails at the end, naming it
            context.log.error(f"{entity_id}: {error}", exc_info=len(context.partition_keys) > 1)
            failures[entity_id] = error
            continue
        yield AssetMaterialization(context.asset_key, partition=key, metadata=metadata)
    with retried_while_store_busy(seconds_to_wait=entity_store.lock_timeout), refusals_as_failures():
        raise_failures(failures, len(context.partition_keys))


def segment_partition(
    context: AssetExecutionContext,
    entity_id: str,
    config: SegmentationConfig,
    store: EntityStore,
    cellpose: CellposeResource,
) -> dict:
    """Segment one image directory, record its masks entity, and return the materialization's metadata."""
    run_id = context.run.run_id
    source = image_directory_entity(store, entity_id)
    # Parameters the run config leaves unset (null) come from the experiment's defaults.
    config = config.resolved_for(source)
    # A URI root gets the masks uploaded under a prefix of this run's own (see output_directory).
    root = mask_root()
    output_dir = f"{root}/{source.entity_id}/{run_id}" if is_uri(root) else root / source.entity_id / run_id

    with staged_image_directory(source, f"{run_id}-") as (grouping, source_fingerprint):
        settings, spec = check_segmentation(source, config, grouping.n_channels)
        segmenter = cellpose.segmenter(spec)

        # The bar shows when a person runs this from a terminal (`mantle segment`); daemon runs log only.
        progress = tqdm(total=len(grouping.fields), desc=f"{source.entity_id} fields", unit="field", disable=None)

        def log_field(outcome):
            progress.update()
            context.log.info(f"{outcome.field}: {outcome.cells} objects in {outcome.seconds:.1f} s")

        scratch = staging_root() / f"{run_id}-{source.entity_id}-masks"
        with progress, output_directory(output_dir, scratch) as partial:
            result = segment_directory(
                grouping,
                segmenter,
                nuclei_channel=config.nuclei_channel,
                cytoplasm_channel=config.cytoplasm_channel,
                settings=settings,
                output_dir=partial,
                max_pixels=max_field_pixels(),
                max_bytes=max_image_bytes(),
                on_field=log_field,
            )
            # Raised inside the block, so the masks never leave their partial folder: an empty result
            # must not become the directory's current masks, which measurements would then read.
            if result.total_cells == 0:
                fields = "the only field" if len(result.fields) == 1 else f"all {len(result.fields)} fields"
                raise NoObjectsError(
                    f"0 objects in {fields} with {config.cellpose_model} "
                    f"(nuclei_channel={config.nuclei_channel}, cytoplasm_channel={config.cytoplasm_channel}, "
                    f"diameter={config.diameter}): check the channel and diameter"
                )
    cells = [f.cells for f in result.fields]
    seconds = [f.seconds for f in result.fields]
    properties = {
        "mask_directory": str(output_dir),
        "source_entity": source.entity_id,
        "objects": "nuclei",  # cell_masks records "cells"
        **config.parameters(),
        "estimated_diameter": result.median_diameter() if settings.diameter is None else None,
        "cellpose_version": cellpose_version(),
        "device": segmenter.device,
        "fields": len(result.fields),
        "total_cells": result.total_cells,
        "cells_per_field": result.cells_per_field(),
        "run_id": run_id,
        "extra_parameters": {
            "flow_threshold": config.flow_threshold,
            "cellprob_threshold": config.cellprob_threshold,
            "min_size": config.min_size,
            "batch_size": config.batch_size,
            "model_path": str(spec.path),
            "precision": segmenter.precision,
        },
        "source_fingerprint": source_fingerprint,
        "model_sha256": spec.weights_sha256(),
    }
    # The entity is the commit point: recorded only once the masks (and their preview) are complete where it says.
    with (
        removed_on_failure(output_dir),
        written_preview(source.entity_id, run_id, result.contact_sheet_png) as preview,
    ):
        output = store.record_output(
            MASK_DIRECTORY,
            f"{source.name} masks",
            properties,
            parents=[source.entity_id],
            pipeline=SEGMENTATION_PIPELINE,
            run_id=run_id,
            parameters={**config.parameters(), **properties["extra_parameters"]},
            before_writing=lambda: check_run_not_ended(context.instance, run_id),
        )

    return {
        "input_entity": source.entity_id,
        "output_entity": output.entity_id,
        "output_version": output.version,
        "output_lineage": lineage_table(store, output.entity_id),
        "input_properties": MetadataValue.json(without_file_lists(source.properties)),
        "experiment_name": source.properties.get("experiment_name") or "",
        "fields": len(result.fields),
        "total_cells": result.total_cells,
        "cells_per_field": MetadataValue.json(summary_metadata(cells)),
        "cellpose_model": config.cellpose_model,
        "parameters": MetadataValue.json(properties["extra_parameters"] | config.parameters()),
        "diameter_px": MetadataValue.float(round(result.median_diameter(), 1)),
        "diameter_estimated": settings.diameter is None,
        "device": segmenter.device,
        "seconds_per_field": MetadataValue.float(round(statistics.mean(seconds), 2)),
        "output_path": MetadataValue.path(str(output_dir)),
        "preview": contact_sheet_markdown(result, source.entity_id, run_id),
        "preview_file": MetadataValue.path(str(preview)),
        "objects_per_field": objects_per_field_table(result),
    }


@contextlib.contextmanager
def written_preview(entity_id: str, run_id: str, png: bytes) -> Iterator[Path]:
    """Write ``png`` to ``$MANTLE_HOME/previews/<entity_id>/<run_id>.png``; remove it if the block fails.

    The file is written as ``.partial-<run_id>`` beside it and renamed, so `mantle ui` never
    serves half a picture. What a killed run leaves, the partial or a preview its run recorded no
    entity of ``entity_id`` for, goes in :func:`~mantle_assets.orchestration.recovery.clean_up_ended_runs`.
    """
    preview = mantle_home() / "previews" / entity_id / f"{run_id}.png"
    partial = preview.with_name(f"{PARTIAL_PREFIX}{run_id}")
    try:
        preview.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(png)
        os.replace(partial, preview)
        yield preview
    except BaseException:
        partial.unlink(missing_ok=True)
        preview.unlink(missing_ok=True)
        raise


def contact_sheet_markdown(result: DirectorySegmentation, entity_id: str, run_id: str) -> MetadataValue:
    """A line of text above the contact sheet of ``entity_id``'s run ``run_id``, linked where `mantle ui` serves it.

    Dagster 1.13 shows a markdown entry in place only when it is under 1,000 characters
    (``MetadataEntry.tsx``), so the picture is a link to :func:`written_preview`'s file
    (``mantle_assets.webserver.PREVIEW_URL``) rather than the PNG inline, and no field name of
    unbounded length is in the text (the tiles name their fields). A plain ``dagster-webserver``
    serves no such path: there the file is at ``preview_file``.
    """
    shown, total = len(result.sheet_fields), len(result.fields)
    which = f"all {total}" if shown == total else f"{shown} of {total}, evenly spaced in plate order"
    return MetadataValue.md(
        f"Outlines on fields: {which}; each tile: well, field, objects\n\n"
        f"![preview]({PREVIEW_URL}{entity_id}/{run_id}.png)"
    )


def objects_per_field_table(result: DirectorySegmentation) -> MetadataValue:
    """Each field's objects, median object area and mask file (in ``output_path``), in the directory's order."""
    return MetadataValue.table(
        records=[
            TableRecord(
                {
                    "field": field.field,
                    "well": field.well or "",
                    "objects": field.cells,
                    "median_area_px": None if field.median_area is None else round(field.median_area, 1),
                    "mask_file": f"{field.field}{MASK_SUFFIX}",
                }
            )
            for field in result.fields
        ],
        schema=TableSchema(
            columns=[
                TableColumn("field", "string"),
                TableColumn("well", "string"),
                TableColumn("objects", "int"),
                TableColumn("median_area_px", "float", description="pixels of the median object"),
                TableColumn("mask_file", "path", description="label image in output_path"),
            ]
        ),
    )


def cellpose_version() -> str:
    from importlib.metadata import version

    return version("cellpose")
