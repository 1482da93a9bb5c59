"""Assets: per-cell measurements of the segmented objects and the plate's assay readout.

Both are partitioned like the masks (one partition per image_directory entity) and read their
inputs from the entity store: the partition's current masks, then its current measurement table.
Each run writes its own folder, which appears complete or not at all, and records one entity with
lineage; the science lives in :mod:`mantle_assets.imaging.measurements` and
:mod:`mantle_assets.imaging.assay`.
"""

import base64
import contextlib
import json
from collections.abc import Collection
from pathlib import Path

import duckdb
import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
    asset_check,
)
from pydantic import Field

from mantle_assets.atomic import atomic_directory, removed_on_failure
from mantle_assets.entities import Entity, EntityStore
from mantle_assets.imaging.assay import PlateReadout, plate_readout, read_plate_layout
from mantle_assets.imaging.measurements import default_channel_names, measure_directory
from mantle_assets.imaging.naming import well_of
from mantle_assets.imaging.plots import dose_response_png, plate_heatmap_png
from mantle_assets.orchestration.assets import (
    MASK_DIRECTORY,
    SEGMENTATION_PIPELINE,
    current_masks,
    current_output,
    image_directory_entity,
    lineage_table,
    segmentation_masks,
    staged_image_directory,
    summary_metadata,
)
from mantle_assets.orchestration.cells import CELL_PIPELINE, cell_masks, cells_of, grown_from
from mantle_assets.orchestration.partitions import entity_id_of, image_directory_partitions
from mantle_assets.orchestration.recovery import check_run_not_ended
from mantle_assets.orchestration.resources import EntityStoreResource
from mantle_assets.orchestration.retries import refusals_as_failures, retried_while_store_busy
from mantle_assets.settings import check_data_path, mantle_home, max_field_pixels, max_image_bytes, staging_root
from mantle_assets.storage import local_copy

MEASUREMENT_PIPELINE = "cell-measurements"
MEASUREMENT_TABLE = "cell_measurement_table"
MEASUREMENT_FILE = "cell_measurements.parquet"
READOUT_PIPELINE = "assay-readout"
ASSAY_READOUT = "assay_readout"
# A nucleus/cytoplasm ratio of mean intensities of a non-negative image is >= 0; a negative one
# means negative pixels (e.g. over-subtracted background), where the ratio means nothing.
MIN_PHYSICAL_RATIO = 0.0
# Digits of the readout values shown in the materialisation's metadata (see PlateReadout.to_json).
DISPLAY_DIGITS = 3


class MeasurementConfig(Config):
    ring_width: int = Field(
        default=5, ge=0, description="Width in pixels of the cytoplasm ring grown around each nucleus."
    )


class AssayConfig(Config):
    readout_channel: str | None = Field(
        default=None,
        description="Channel whose nucleus/cytoplasm ratio is the readout; default: the first channel "
        "that was not segmented (e.g. NFkB when DNA was).",
    )
    min_cells: int = Field(default=50, ge=0, description="Wells with fewer objects are flagged and not used.")


def current_masks_of(store: EntityStore, entity_id: str) -> Entity:
    masks = current_masks(store, entity_id)
    if masks is None:
        raise ValueError(f"{entity_id} has no segmentation masks: materialise segmentation_masks first")
    return masks


def made_from(measured: Entity, masks: Entity) -> bool:
    """Whether a measurement table measured these masks (this entity, as this run made it)."""
    return (measured.properties["mask_entity"], measured.properties.get("mask_run_id")) == (
        masks.entity_id, masks.properties.get("run_id")
    )


def used_cells(measured: Entity, cells: Entity) -> bool:
    """Whether a measurement table's cytoplasm was these cell masks (as their run made them) minus the nuclei."""
    return (measured.properties.get("cell_mask_entity"), measured.properties.get("cell_mask_run_id")) == (
        cells.entity_id, cells.properties.get("run_id")
    )


def needs_measuring(store: EntityStore, entity_ids: Collection[str]) -> set[str]:
    """The image directories among ``entity_ids`` with current masks that no measurement table measured yet,
    or whose measurements did not use the cells grown from those masks since (``cytoplasm: ring`` before them).

    Three store queries, however many directories.
    """
    masks = store.current_outputs(SEGMENTATION_PIPELINE, MASK_DIRECTORY, entity_ids)
    cells = store.current_outputs(CELL_PIPELINE, MASK_DIRECTORY, list(masks))
    measured = store.current_outputs(MEASUREMENT_PIPELINE, MEASUREMENT_TABLE, list(masks))

    def current(entity_id: str, nuclei: Entity) -> bool:
        table = measured.get(entity_id)
        if table is None or not made_from(table, nuclei):
            return False
        grown = cells.get(entity_id)
        return not grown_from(grown, nuclei) or used_cells(table, grown)

    return {entity_id for entity_id, nuclei in masks.items() if not current(entity_id, nuclei)}


def current_measurements_of(store: EntityStore, entity_id: str) -> Entity:
    """The partition's measurement table, refused when the masks were segmented again since."""
    measured = current_output(store, entity_id, MEASUREMENT_PIPELINE, MEASUREMENT_TABLE)
    if measured is None:
        raise ValueError(f"{entity_id} has no cell measurements: materialise cell_measurements first")
    masks = current_masks_of(store, entity_id)
    if not made_from(measured, masks):
        raise ValueError(
            f"{measured.entity_id} measured older masks than {masks.entity_id} (run {masks.properties.get('run_id')}): "
            "materialise cell_measurements again"
        )
    return measured


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write a DataFrame as Parquet with DuckDB (in memory; no database file involved)."""
    with duckdb.connect() as connection:
        connection.from_df(frame).write_parquet(str(path))


def read_parquet(path: str | Path) -> pd.DataFrame:
    with duckdb.connect() as connection:
        return connection.execute("SELECT * FROM read_parquet(?)", [str(path)]).df()


def column_schema(frame: pd.DataFrame) -> TableSchema:
    return TableSchema(columns=[TableColumn(str(name), str(dtype)) for name, dtype in frame.dtypes.items()])


# cell_masks is a dependency for lineage and staleness (new cells make the table stale), not a requirement:
# without cells grown from the current nuclei the cytoplasm is a ring around each nucleus.
@asset(
    deps=[segmentation_masks, cell_masks],
    partitions_def=image_directory_partitions,
    group_name="measurements",
    kinds={"scikit-image", "parquet", "duckdb"},
    owners=["team:imaging"],
    description="Per-object shape and nucleus/cytoplasm intensities of every channel, measured on the "
    "partition's current masks: a Parquet file recorded as a cell_measurement_table entity linked to the "
    "masks and the images, and rows of the DuckDB table cell_measurements. The cytoplasm is the cell minus "
    "its nucleus when the partition's current cell masks were grown from its current nuclei (cytoplasm: "
    "cell), else a ring around each nucleus (cytoplasm: ring).",
)
def cell_measurements(
    context: AssetExecutionContext, config: MeasurementConfig, entity_store: EntityStoreResource
) -> MaterializeResult:
    with retried_while_store_busy(seconds_to_wait=entity_store.lock_timeout):
        return measure_partition(context, config, entity_store.store())


def measure_partition(
    context: AssetExecutionContext, config: MeasurementConfig, store: EntityStore
) -> MaterializeResult:
    with refusals_as_failures():
        source = image_directory_entity(store, entity_id_of(context.partition_key))
        masks = current_masks_of(store, source.entity_id)
        cells = cells_of(store, source.entity_id, masks)
    run_id = context.run.run_id
    output_dir = mantle_home() / "measurements" / source.entity_id / run_id

    # Images and masks on object storage are read from local copies, removed afterwards.
    with (
        staged_image_directory(source, f"{run_id}-") as (grouping, _),
        local_copy(masks.properties["mask_directory"], staging_root(), f"{run_id}-") as mask_directory,
        local_copy(cells.properties["mask_directory"], staging_root(), f"{run_id}-cells-")
        if cells else contextlib.nullcontext() as cell_mask_directory,
        atomic_directory(output_dir) as partial,
    ):
        names = source.properties.get("channel_names") or default_channel_names(grouping.channel_labels)
        table = measure_directory(
            grouping,
            mask_directory,
            names,
            cell_mask_directory=cell_mask_directory,
            ring_width=config.ring_width,
            max_pixels=max_field_pixels(),
            max_bytes=max_image_bytes(),
            on_field=lambda field, count: context.log.info(f"{field}: {count} objects measured"),
        )
        write_parquet(table, partial / MEASUREMENT_FILE)
    # The table's attrs are not stored with it: the entity and the readout carry the flag.
    cytoplasm = table.attrs["cytoplasm"]
    per_field = table.groupby("field").size()
    objects_per_field = {field.name: int(per_field.get(field.name, 0)) for field in grouping.fields}
    properties = {
        "measurement_file": str(output_dir / MEASUREMENT_FILE),
        "mask_entity": masks.entity_id,
        "source_entity": source.entity_id,
        "channel_names": list(names),
        "ring_width": config.ring_width,
        "mask_run_id": masks.properties.get("run_id"),
        "cytoplasm": cytoplasm,
        **({"cell_mask_entity": cells.entity_id, "cell_mask_run_id": cells.properties["run_id"]} if cells else {}),
        "fields": len(grouping.fields),
        "total_objects": len(table),
        "objects_per_field": objects_per_field,
        "columns": [str(column) for column in table.columns],
        "run_id": run_id,
    }
    with removed_on_failure(output_dir):
        output = store.record_output(
            MEASUREMENT_TABLE,
            f"{source.name} cell measurements",
            properties,
            parents=[masks.entity_id, source.entity_id, *([cells.entity_id] if cells else [])],
            pipeline=MEASUREMENT_PIPELINE,
            run_id=run_id,
            parameters={"ring_width": config.ring_width, "channel_names": list(names), "cytoplasm": cytoplasm},
            measurements=table,
            before_writing=lambda: check_run_not_ended(context.instance, run_id),
        )
    return MaterializeResult(
        metadata={
            "input_entity": source.entity_id,
            "mask_entity": masks.entity_id,
            "cytoplasm": cytoplasm,
            "cell_mask_entity": cells.entity_id if cells else "",
            "output_entity": output.entity_id,
            "output_version": output.version,
            "output_lineage": lineage_table(store, output.entity_id),
            "channel_names": MetadataValue.json(list(names)),
            "ring_width": config.ring_width,
            "fields": len(grouping.fields),
            "total_objects": len(table),
            "objects_per_field": MetadataValue.json(summary_metadata(list(objects_per_field.values()))),
            "dagster/column_schema": column_schema(table),
            "dagster/row_count": len(table),
            "output_path": MetadataValue.path(properties["measurement_file"]),
        }
    )


def readout_column(requested: str | None, channel_names: list[str], masks: Entity) -> str:
    """``<channel>_ratio`` of the requested channel, else of the first channel that was not segmented."""
    if requested is not None:
        if requested not in channel_names:
            raise ValueError(f"readout_channel {requested!r} is not one of the channels {channel_names}")
        return f"{requested}_ratio"
    segmented = masks.properties["nuclei_channel"] or masks.properties["cytoplasm_channel"]
    others = [name for index, name in enumerate(channel_names, start=1) if index != segmented]
    return f"{(others or channel_names)[0]}_ratio"


def _png_markdown(title: str, png: bytes) -> str:
    return f"**{title}**\n\n![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _table(frame: pd.DataFrame, records: list[dict]) -> MetadataValue:
    """``records`` (the rows of ``frame``, perhaps rounded) as a metadata table typed by ``frame``'s columns."""
    kinds = {"b": "bool", "i": "int", "u": "int", "f": "float"}
    return MetadataValue.table(
        records=[TableRecord(record) for record in records],
        schema=TableSchema(
            columns=[TableColumn(str(name), kinds.get(dtype.kind, "string")) for name, dtype in frame.dtypes.items()]
        ),
    )


def write_readout(readout: PlateReadout, folder: Path, title: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """Write the wells and doses tables (CSV and Parquet) and the figures into ``folder``.

    Returns the figures and notes on missing ones.
    """
    for name, table in (("wells", readout.wells), ("doses", readout.doses)):
        table.to_csv(folder / f"{name}.csv", index=False)
        write_parquet(table, folder / f"{name}.parquet")
    figures, notes = {}, {}
    if not readout.doses.empty:
        figures["dose_response.png"] = dose_response_png(readout.doses, readout.fit, title=title)
    try:
        figures["plate_heatmap.png"] = plate_heatmap_png(
            readout.wells, value_column="median", title=f"{title}: median {readout.value_column} per well"
        )
    except ValueError as error:  # wells off a 96-well plate: the tables still say everything
        notes["plate_heatmap"] = str(error)
    for name, png in figures.items():
        (folder / name).write_bytes(png)
    return figures, notes


@asset(
    deps=[cell_measurements],
    partitions_def=image_directory_partitions,
    group_name="measurements",
    kinds={"scipy", "matplotlib", "duckdb"},
    owners=["team:imaging"],
    description="The plate's readout from its cell measurements and plate layout: per-well cell count, "
    "median nucleus/cytoplasm ratio and QC flags, per-dose mean and SD, a 4-parameter logistic fit "
    "(EC50 with 95% CI), Z' of the controls, a dose-response plot and a plate heat map; recorded as an "
    "assay_readout entity and rows of the DuckDB tables assay_readouts and readout_wells (one row per well), "
    "with the tables also as CSV and Parquet files.",
)
def assay_readout(
    context: AssetExecutionContext, config: AssayConfig, entity_store: EntityStoreResource
) -> MaterializeResult:
    with retried_while_store_busy(seconds_to_wait=entity_store.lock_timeout):
        return read_out_partition(context, config, entity_store.store())


def recorded_wells(source: Entity, fields: list[str]) -> list[str]:
    """The wells of ``fields`` as the naming scheme read them at registration, in plate order.

    Directories registered before wells were recorded have their field names read by ``well_of``.
    """
    recorded = (source.properties.get("field_grouping") or {}).get("wells") or {}
    wells = {recorded[field] if field in recorded else well_of(field) for field in fields} - {None}
    return sorted(wells, key=lambda well: (len(well), well))


def read_out_partition(context: AssetExecutionContext, config: AssayConfig, store: EntityStore) -> MaterializeResult:
    with refusals_as_failures():
        source = store.get(entity_id_of(context.partition_key))
        measured = current_measurements_of(store, source.entity_id)
        masks = store.get(measured.properties["mask_entity"])
        value_column = readout_column(config.readout_channel, measured.properties["channel_names"], masks)
        layout_file = source.properties.get("plate_layout")
        # Checked again now: the file may have been replaced by a link out of the data roots since registration.
        layout = read_plate_layout(check_data_path(layout_file, "plate_layout")) if layout_file else None
    readout = plate_readout(
        read_parquet(measured.properties["measurement_file"]),
        value_column=value_column,
        layout=layout,
        expected_wells=recorded_wells(source, list(measured.properties["objects_per_field"])),
        min_cells=config.min_cells,
    )
    for part, reason in readout.notes.items():
        context.log.warning(f"{source.entity_id}: no {part}: {reason}")

    run_id = context.run.run_id
    output_dir = mantle_home() / "readouts" / source.entity_id / run_id
    title = source.properties.get("experiment_name") or source.name
    with atomic_directory(output_dir) as partial:
        figures, figure_notes = write_readout(readout, partial, title)
        summary = readout.to_json()
        summary["notes"] |= figure_notes
        (partial / "readout.json").write_text(json.dumps(summary, indent=2))
    properties = {
        "readout_directory": str(output_dir),
        "measurement_entity": measured.entity_id,
        "readout": value_column,
        "cytoplasm": measured.properties.get("cytoplasm", "ring"),
        "plate_layout": layout_file,
        "n_cells": summary["n_cells"],
        "wells": summary["wells"],
        "z_prime": summary["z_prime"],
        "ec50": summary["ec50"],
        "fit": summary["fit"],
        "doses": summary["doses"],
        "notes": summary["notes"],
        "run_id": run_id,
    }
    with removed_on_failure(output_dir):
        output = store.record_output(
            ASSAY_READOUT,
            f"{source.name} assay readout",
            properties,
            parents=[measured.entity_id],
            pipeline=READOUT_PIPELINE,
            run_id=run_id,
            parameters={"readout": value_column, "min_cells": config.min_cells, "plate_layout": layout_file},
            readout=summary | {"image_directory": source.entity_id},
            before_writing=lambda: check_run_not_ended(context.instance, run_id),
        )

    # Rounded for people; the entity, the tables and the files keep full precision.
    shown = readout.to_json(digits=DISPLAY_DIGITS)
    metadata = {
        "input_entity": measured.entity_id,
        "output_entity": output.entity_id,
        "output_version": output.version,
        "output_lineage": lineage_table(store, output.entity_id),
        "readout": value_column,
        "cytoplasm": properties["cytoplasm"],
        "n_cells": summary["n_cells"],
        "z_prime": MetadataValue.float(shown["z_prime"]) if shown["z_prime"] is not None else "n/a",
        "ec50": MetadataValue.float(shown["ec50"]) if shown["fit"] else "n/a",
        "ec50_ci95": MetadataValue.json(shown["ec50_ci95"]) if shown["fit"] else "n/a",
        "fit": MetadataValue.json(shown["fit"] or {}),
        "notes": MetadataValue.json(summary["notes"]),
        "wells": _table(readout.wells, shown["wells"]),
        "doses": _table(readout.doses, shown["doses"]),
        "output_path": MetadataValue.path(str(output_dir)),
    }
    if figures:
        metadata["plots"] = MetadataValue.md(
            "\n\n".join(_png_markdown(name.removesuffix(".png").replace("_", " "), png)
                         for name, png in figures.items())
        )
    return MaterializeResult(metadata=metadata)


@asset_check(
    asset=cell_measurements,
    partitions_def=image_directory_partitions,
    description="Warns when a field has no objects (an empty, out-of-focus or mis-segmented field).",
)
def fields_have_objects(context: AssetCheckExecutionContext, entity_store: EntityStoreResource) -> AssetCheckResult:
    entity_id = entity_id_of(context.partition_key)
    measured = current_output(entity_store.store(), entity_id, MEASUREMENT_PIPELINE, MEASUREMENT_TABLE)
    if measured is None:
        return AssetCheckResult(passed=False, severity=AssetCheckSeverity.WARN, description="no measurements yet")
    empty = [field for field, count in measured.properties["objects_per_field"].items() if count == 0]
    return AssetCheckResult(
        passed=not empty,
        severity=AssetCheckSeverity.WARN,
        description=f"{len(empty)} field(s) without objects" if empty else "every field has objects",
        metadata={"entity": measured.entity_id, "empty_fields": MetadataValue.json(empty)},
    )


@asset_check(
    asset=cell_measurements,
    partitions_def=image_directory_partitions,
    description="Warns when a nucleus/cytoplasm ratio is negative, which no non-negative image gives "
    "(negative pixels, e.g. over-subtracted background).",
)
def ratios_within_physical_bounds(
    context: AssetCheckExecutionContext, entity_store: EntityStoreResource
) -> AssetCheckResult:
    entity_id = entity_id_of(context.partition_key)
    measured = current_output(entity_store.store(), entity_id, MEASUREMENT_PIPELINE, MEASUREMENT_TABLE)
    if measured is None:
        return AssetCheckResult(passed=False, severity=AssetCheckSeverity.WARN, description="no measurements yet")
    table = read_parquet(measured.properties["measurement_file"])
    ratios = [column for column in table.columns if column.endswith("_ratio")]
    below = {column: int((table[column] < MIN_PHYSICAL_RATIO).sum()) for column in ratios}
    undefined = {column: int(table[column].isna().sum()) for column in ratios}
    return AssetCheckResult(
        passed=not any(below.values()),
        severity=AssetCheckSeverity.WARN,
        description=", ".join(f"{n} negative {c}" for c, n in below.items() if n) or "every ratio is >= 0",
        metadata={
            "entity": measured.entity_id,
            "negative_ratios": MetadataValue.json(below),
            "undefined_ratios (empty or dark cytoplasm)": MetadataValue.json(undefined),
        },
    )


@asset_check(
    asset=assay_readout,
    partitions_def=image_directory_partitions,
    description="Warns about wells with far fewer cells than the plate median (under half) or fewer than "
    "min_cells: dead, detached or badly imaged wells.",
)
def wells_have_enough_cells(context: AssetCheckExecutionContext, entity_store: EntityStoreResource) -> AssetCheckResult:
    store = entity_store.store()
    measured = current_output(store, entity_id_of(context.partition_key), MEASUREMENT_PIPELINE, MEASUREMENT_TABLE)
    readout = measured and current_output(store, measured.entity_id, READOUT_PIPELINE, ASSAY_READOUT)
    if not readout:
        return AssetCheckResult(passed=False, severity=AssetCheckSeverity.WARN, description="no readout yet")
    wells = readout.properties["wells"]
    low = [w["well"] for w in wells if w["low_count_vs_plate"]]
    few = [w["well"] for w in wells if w["too_few_cells"]]
    counts = sorted(w["n_cells"] for w in wells)
    return AssetCheckResult(
        passed=not (low or few),
        severity=AssetCheckSeverity.WARN,
        description=f"{len(low)} well(s) under half the plate median, {len(few)} under min_cells"
        if low or few else "every well has enough cells",
        metadata={
            "entity": readout.entity_id,
            "wells_under_half_median": MetadataValue.json(low),
            "wells_under_min_cells": MetadataValue.json(few),
            "plate_median_cells": MetadataValue.float(float(pd.Series(counts).median()) if counts else 0.0),
        },
    )


measurement_checks = [fields_have_objects, ratios_within_physical_bounds, wells_have_enough_cells]
