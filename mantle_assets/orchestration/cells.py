"""The ``cell_masks`` asset: whole cells around the partition's current nuclei masks.

Cells are a second ``segmentation_mask_directory`` entity of the image directory, ``objects:
cells``, made by the pipeline ``cell-masks`` from the nuclei masks and the images (lineage edges
from both) and labelled as their nuclei, so that measurements pair each nucleus with its cell by
label. Two methods (:class:`CellConfig`): ``propagate`` grows each nucleus into its cell on the
cytoplasm channel (:func:`~mantle_assets.imaging.cells.propagate_cells`, offline, CPU), ``cellpose``
segments whole cells with a Cellpose model (``cyto3``, or a model file) and relates the nuclei to
them (:func:`~mantle_assets.imaging.cells.match_nuclei_to_cells`), reporting cells with several
nuclei or none.
"""


import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from mantle_assets.atomic import output_directory, removed_on_failure
from mantle_assets.entities import Entity, EntityStore
from mantle_assets.imaging.cells import match_nuclei_to_cells, propagate_cells
from mantle_assets.imaging.fields import MASK_SUFFIX, FieldGrouping, read_field
from mantle_assets.imaging.io import read_label_image, write_label_image
from mantle_assets.imaging.segmentation import (
    ParameterError,
    SegmentationSettings,
    check_channels,
    numbered_channels,
    parse_diameter,
    select_channels,
)
from mantle_assets.models.registry import resolve_model
from mantle_assets.orchestration.assets import (
    GPU_OP_TAGS,
    MASK_DIRECTORY,
    ModelResolver,
    cellpose_version,
    current_masks,
    current_output,
    image_directory_entity,
    lineage_table,
    segmentation_masks,
    staged_image_directory,
    summary_metadata,
)
from mantle_assets.orchestration.config import CELL_METHODS, coerce_segmentation_parameters
from mantle_assets.orchestration.partitions import entity_id_of, image_directory_partitions
from mantle_assets.orchestration.recovery import check_run_not_ended
from mantle_assets.orchestration.resources import CellposeResource, EntityStoreResource
from mantle_assets.orchestration.retries import refusals_as_failures, retried_while_store_busy
from mantle_assets.settings import mask_root, max_field_pixels, max_image_bytes, staging_root
from mantle_assets.storage import is_uri, local_copy

CELL_PIPELINE = "cell-masks"
CELLS = "cells"




class CellConfig(Config):
    """Run parameters of ``cell_masks``; unset channels follow the nuclei masks."""

    method: Literal[CELL_METHODS] = Field(
        default="propagate",
        description="propagate: grow each nucleus into its cell on the cytoplasm channel (offline, CPU); "
        "cellpose: segment whole cells with cellpose_model, then match the nuclei to them.",
    )
    cytoplasm_channel: Any = Field(
        default=None,
        description="Channel the cells are found on: c >= 1 = the c-th channel of a field, or a channel's name "
        "(NFkB). Empty (null): the first channel the nuclei were not segmented on.",
    )
    threshold: float | None = Field(
        default=None,
        description="propagate: foreground threshold in the cytoplasm channel's units; empty (null): three-class "
        "Otsu on the log of the smoothed channel (the middle class is foreground).",
    )
    threshold_correction: float = Field(
        default=1.0, gt=0, description="propagate: factor on the automatic threshold; above 1 makes cells smaller."
    )
    regularization: float = Field(
        default=0.05,
        ge=0,
        description="propagate: weight of the distance to the nuclei against the intensity (0: intensity alone; "
        "large: half-way between nuclei), like CellProfiler's regularization factor.",
    )
    smoothing: float = Field(
        default=0.75, ge=0, description="propagate: Gaussian sigma in pixels before thresholding and flooding."
    )
    cellpose_model: str = Field(
        default="cyto3", description="cellpose: a whole-cell model, Cellpose built-in name (cyto3) or model file path."
    )
    nuclei_channel: Any = Field(
        default=None,
        description="cellpose: the nuclear channel given to the model with the cytoplasm; empty (null): the "
        "channel the nuclei masks were segmented on.",
    )
    diameter: Any = Field(
        default=None, description="cellpose: cell diameter in pixels, or None (also when empty) to estimate it."
    )

    def parameters(self) -> dict:
        """The method's own parameters, as recorded on the entity and its lineage edges."""
        if self.method == "propagate":
            return {
                "method": self.method,
                "threshold": self.threshold,
                "threshold_correction": self.threshold_correction,
                "regularization": self.regularization,
                "smoothing": self.smoothing,
            }
        return {"method": self.method, "cellpose_model": self.cellpose_model, "diameter": self.diameter_text()}

    def diameter_text(self) -> str:
        return coerce_segmentation_parameters({"diameter": self.diameter})["diameter"]


def segmented_channel(nuclei: Entity) -> int:
    """The channel the nuclei were segmented on (Mantle's parameters: the nuclear one, else the segmented one)."""
    return nuclei.properties["nuclei_channel"] or nuclei.properties["cytoplasm_channel"]


def cell_channels(config: CellConfig, source: Entity, nuclei: Entity, n_channels: int | None) -> tuple[int, int]:
    """The (nuclei, cytoplasm) channel numbers of a cell request, checked against the images' channels.

    Raises
    ------
    ParameterError
        One line naming the parameter: a channel name none of the entity's, a channel the
        images lack, a cytoplasm channel that is the nuclear one or 0 (grayscale is no cytoplasm).
    """
    labels = (source.properties.get("field_grouping") or {}).get("channel_labels") or ()
    given = {name: getattr(config, name) for name in ("nuclei_channel", "cytoplasm_channel")}
    given = coerce_segmentation_parameters({k: v for k, v in given.items() if v is not None}, "cell_masks")
    given = numbered_channels(given, source.properties.get("channel_names"), labels)
    nuclear = given.get("nuclei_channel", segmented_channel(nuclei))
    if "cytoplasm_channel" in given:
        cytoplasm = given["cytoplasm_channel"]
    else:
        others = [c for c in range(1, (n_channels or 0) + 1) if c != nuclear]
        if not others:
            raise ParameterError(
                f"cell_masks needs a cytoplasm channel besides the nuclei's ({nuclear}), and "
                f"{source.entity_id} has {n_channels or 1} channel(s)"
            )
        cytoplasm = others[0]
    if cytoplasm == 0 or cytoplasm == nuclear:
        raise ParameterError(
            f"cytoplasm_channel={cytoplasm} must be a channel of its own, not 0 (grayscale) nor the nuclei's "
            f"({nuclear})"
        )
    check_channels(nuclear, cytoplasm, n_channels)
    return nuclear, cytoplasm


def check_cell_request(
    config: CellConfig, source: Entity, nuclei: Entity, n_channels: int | None, resolve: ModelResolver = resolve_model
):
    """Everything a cell request can be refused for, before any image is read.

    ``resolve`` finds the cellpose method's model (see :func:`~mantle_assets.orchestration.assets.check_segmentation`).

    Returns
    -------
    (int, int, ModelSpec or None, SegmentationSettings or None)
        The nuclei and cytoplasm channels; for ``cellpose`` the model and its settings.

    Raises
    ------
    ValueError
        One line naming the parameter or the model.
    """
    nuclear, cytoplasm = cell_channels(config, source, nuclei, n_channels)
    if config.method == "propagate":
        if config.threshold is not None and config.threshold_correction != 1.0:
            raise ParameterError("threshold_correction applies to the automatic threshold: leave it 1 with threshold")
        return nuclear, cytoplasm, None, None
    settings = SegmentationSettings(diameter=parse_diameter(config.diameter_text()))
    spec = resolve(config.cellpose_model)
    spec.check_channels(nuclear, cytoplasm)
    return nuclear, cytoplasm, spec, settings


def checked_cell_request(
    store: EntityStore, entity_id: str, config: CellConfig, resolve: ModelResolver = resolve_model
) -> tuple[Entity, Entity]:
    """Check a cell request for a partition reading no image: the entity, its current nuclei masks, the parameters.

    The step's first check, and the run queue's before it queues the run
    (:mod:`mantle_assets.orchestration.coordinator`, with ``resolve`` that starts no download).

    Returns
    -------
    (Entity, Entity)
        The image directory and its current nuclei masks.

    Raises
    ------
    ValueError
        One line naming the entity, the parameter or the model.
    """
    source = image_directory_entity(store, entity_id)
    nuclei = current_nuclei_of(store, source.entity_id)
    recorded_channels = (source.properties.get("field_grouping") or {}).get("n_channels")
    check_cell_request(config, source, nuclei, recorded_channels, resolve)
    return source, nuclei


def current_cell_masks(store: EntityStore, entity_id: str) -> Entity | None:
    return current_output(store, entity_id, CELL_PIPELINE, MASK_DIRECTORY)


def grown_from(cells: Entity | None, nuclei: Entity | None) -> bool:
    """Whether cell masks were grown from these nuclei masks, as the nuclei's run made them."""
    if cells is None or nuclei is None:
        return False
    made_from = (cells.properties.get("nuclei_mask_entity"), cells.properties.get("nuclei_run_id"))
    return made_from == (nuclei.entity_id, nuclei.properties.get("run_id"))


def cells_of(store: EntityStore, entity_id: str, nuclei: Entity | None) -> Entity | None:
    """The partition's current cell masks if they were grown from ``nuclei`` (as that run made them), else None."""
    cells = current_cell_masks(store, entity_id) if nuclei is not None else None
    return cells if grown_from(cells, nuclei) else None


def current_nuclei_of(store: EntityStore, entity_id: str) -> Entity:
    nuclei = current_masks(store, entity_id)
    if nuclei is None:
        raise ValueError(f"{entity_id} has no nuclei masks: materialise segmentation_masks first")
    return nuclei


@asset(
    deps=[segmentation_masks],
    partitions_def=image_directory_partitions,
    group_name="segmentation",
    kinds={"scikit-image", "cellpose", "duckdb"},
    owners=["team:imaging"],
    # The cellpose method runs a network; propagation waits for the slot too (seconds), since tags are per op.
    op_tags=GPU_OP_TAGS,
    pool="gpu",
    description="Whole cells around the partition's current nuclei masks, one `<field>_cp_masks.tif` per field, "
    "each cell labelled as its nucleus: grown on the cytoplasm channel (method propagate, the default) or "
    "segmented by a whole-cell Cellpose model and matched to the nuclei (method cellpose). Recorded as a "
    "segmentation_mask_directory entity with objects: cells, linked to the nuclei masks and the images.",
)
def cell_masks(
    context: AssetExecutionContext,
    config: CellConfig,
    entity_store: EntityStoreResource,
    cellpose: CellposeResource,
) -> MaterializeResult:
    with retried_while_store_busy(seconds_to_wait=entity_store.lock_timeout):
        return grow_partition(context, config, entity_store.store(), cellpose)


def grow_partition(
    context: AssetExecutionContext, config: CellConfig, store: EntityStore, cellpose: CellposeResource
) -> MaterializeResult:
    run_id = context.run.run_id
    with refusals_as_failures():
        source, nuclei = checked_cell_request(store, entity_id_of(context.partition_key), config)
    root = mask_root()
    # Not in the nuclei's <entity>/<run> (one run may make both), but in the same two-level layout, which the
    # cleanup of failed and canceled runs (clean_up_ended_runs) searches for unrecorded outputs.
    folder = f"{source.entity_id}-cells"
    output_dir = f"{root}/{folder}/{run_id}" if is_uri(root) else root / folder / run_id
    with (
        staged_image_directory(source, f"{run_id}-") as (grouping, source_fingerprint),
        local_copy(nuclei.properties["mask_directory"], staging_root(), f"{run_id}-") as nuclei_dir,
    ):
        with refusals_as_failures():
            nuclear, cytoplasm, spec, settings = check_cell_request(config, source, nuclei, grouping.n_channels)
        segmenter = cellpose.segmenter(spec) if spec is not None else None
        scratch = staging_root() / f"{run_id}-{source.entity_id}-cells"
        with output_directory(output_dir, scratch) as partial:
            fields = list(grow_fields(
                context, config, grouping, Path(nuclei_dir), partial, (nuclear, cytoplasm), segmenter, settings
            ))
    counts = {f["field"]: f["cells"] for f in fields}
    border = {f["field"]: f["border"] for f in fields}
    properties = {
        "mask_directory": str(output_dir),
        "source_entity": source.entity_id,
        "objects": CELLS,
        "method": config.method,
        "nuclei_channel": nuclear,
        "cytoplasm_channel": cytoplasm,
        # Propagated cells keep the model and diameter that found their nuclei; the cellpose method records its own.
        "cellpose_model": nuclei.properties["cellpose_model"],
        "diameter": nuclei.properties["diameter"],
        "nuclei_mask_entity": nuclei.entity_id,
        "nuclei_run_id": nuclei.properties.get("run_id"),
        "cell_parameters": config.parameters(),
        "fields": len(fields),
        "total_cells": sum(counts.values()),
        "cells_per_field": counts,
        "border_cells": border,
        "run_id": run_id,
        "source_fingerprint": source_fingerprint,
    }
    if segmenter is not None:
        properties |= {
            "cellpose_model": config.cellpose_model,
            "diameter": config.diameter_text(),
            "cellpose_version": cellpose_version(),
            "device": segmenter.device,
            "model_sha256": spec.weights_sha256(),
            "multinucleate": {f["field"]: f["multinucleate"] for f in fields if f["multinucleate"]},
            "anucleate": {f["field"]: f["anucleate"] for f in fields if f["anucleate"]},
        }
    with removed_on_failure(output_dir):
        output = store.record_output(
            MASK_DIRECTORY,
            f"{source.name} cells",
            properties,
            parents=[nuclei.entity_id, source.entity_id],
            pipeline=CELL_PIPELINE,
            run_id=run_id,
            parameters={**config.parameters(), "nuclei_channel": nuclear, "cytoplasm_channel": cytoplasm},
            before_writing=lambda: check_run_not_ended(context.instance, run_id),
        )
    metadata = {
        "input_entity": source.entity_id,
        "nuclei_mask_entity": nuclei.entity_id,
        "output_entity": output.entity_id,
        "output_version": output.version,
        "output_lineage": lineage_table(store, output.entity_id),
        "objects": CELLS,
        "method": config.method,
        "parameters": MetadataValue.json(properties["cell_parameters"]),
        "nuclei_channel": nuclear,
        "cytoplasm_channel": cytoplasm,
        "fields": len(fields),
        "total_cells": properties["total_cells"],
        "cells_per_field": MetadataValue.json(summary_metadata(list(counts.values()) or [0])),
        "border_cells": sum(len(cells) for cells in border.values()),
        "seconds_per_field": MetadataValue.float(round(statistics.mean(f["seconds"] for f in fields), 2)),
        "output_path": MetadataValue.path(str(output_dir)),
    }
    if segmenter is not None:
        metadata |= {
            "multinucleate_cells": sum(len(cells) for cells in properties["multinucleate"].values()),
            "multinucleate": MetadataValue.json(properties["multinucleate"]),
            "anucleate_cells": sum(properties["anucleate"].values()),
            "device": segmenter.device,
        }
    return MaterializeResult(metadata=metadata)


def grow_fields(
    context: AssetExecutionContext,
    config: CellConfig,
    grouping: FieldGrouping,
    nuclei_dir: Path,
    output_dir: Path,
    channels: tuple[int, int],
    segmenter,
    settings: SegmentationSettings | None,
) -> Iterator[dict]:
    """Write each field's cells into ``output_dir``; yield what each field found.

    ``channels``: the (nuclei, cytoplasm) channel numbers; ``segmenter``: a loaded whole-cell
    Cellpose model for the cellpose method, None to propagate.
    """
    nuclear, cytoplasm = channels
    for field in grouping.fields:
        start = time.perf_counter()
        nuclei = read_label_image(nuclei_dir / f"{field.name}{MASK_SUFFIX}", max_pixels=max_field_pixels())
        stack = read_field(field, max_pixels=max_field_pixels(), max_bytes=max_image_bytes())
        found = {"field": field.name, "multinucleate": {}, "anucleate": 0}
        if segmenter is None:
            grown = propagate_cells(
                nuclei,
                stack[cytoplasm - 1],
                threshold=config.threshold,
                threshold_correction=config.threshold_correction,
                regularization=config.regularization,
                smoothing=config.smoothing,
            )
            cells, border = grown.cells, grown.touching_border
        else:
            # Cellpose's whole-cell input: the channel to segment, then the nuclei.
            image = select_channels(stack, nuclear, cytoplasm)
            segmented = segmenter.segment(image, settings, max_bytes=max_image_bytes(), field=field.name).masks
            matched = match_nuclei_to_cells(nuclei, segmented)
            cells, border = matched.cells, matched.touching_border
            found["multinucleate"] = {str(cell): list(held) for cell, held in matched.multinucleate.items()}
            found["anucleate"] = len(matched.anucleate)
        write_label_image(output_dir / f"{field.name}{MASK_SUFFIX}", cells)
        found |= {
            "cells": int(np.unique(cells[cells > 0]).size),
            "border": border.tolist(),
            "seconds": time.perf_counter() - start,
        }
        context.log.info(f"{field.name}: {found['cells']} cells in {found['seconds']:.1f} s")
        yield found
