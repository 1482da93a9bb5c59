"""cell_masks end to end, and the measurements that use its cells: real entity store, real Dagster instance,
real Cellpose on BBBC014 crops and on a drawn field."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.draw import disk
from skimage.filters import threshold_otsu
from skimage.measure import label

from mantle_assets.cli import root_cause
from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.models.registry import resolve_model
from mantle_assets.orchestration.measurements import read_parquet
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.registration import register_image_directory
from mantle_assets.settings import mask_root
from mantle_assets_tests.conftest import TWO_WELLS


def run_job(instance, job, entity_id, ops=None):
    return defs.resolve_job_def(job).execute_in_process(
        run_config={"ops": {name: {"config": config} for name, config in (ops or {}).items()}},
        instance=instance,
        partition_key=entity_id,
        raise_on_error=False,
    )


def register(instance, directory) -> object:
    entity = register_image_directory(EntityStore(), directory, "NF-kB", channel_names=["NFkB", "DNA"])
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])
    return entity


@pytest.fixture
def plate(bbbc014_crops, instance):
    return register(instance, bbbc014_crops)


def drawn_nuclei(entity, folder: Path, run_id: str, labels_of_field: dict) -> object:
    """Record label images as the partition's nuclei masks, as segmentation_masks would."""
    folder.mkdir(parents=True)
    for field, labels in labels_of_field.items():
        tifffile.imwrite(folder / f"{field}_cp_masks.tif", labels.astype(np.uint16))
    return EntityStore().record_output(
        "segmentation_mask_directory",
        f"{entity.name} masks",
        {"mask_directory": folder, "source_entity": entity.entity_id, "objects": "nuclei", "cellpose_model": "drawn",
         "nuclei_channel": 2, "cytoplasm_channel": 2, "diameter": "None", "run_id": run_id},
        parents=[entity.entity_id],
        pipeline="cellpose-segmentation",
        run_id=run_id,
        parameters={},
    )


def otsu_nuclei(entity, folder: Path, run_id: str) -> object:
    """Nuclei of the crops' DNA channel by an Otsu threshold: quick, and good enough to grow cells from."""
    labels = {}
    for well in TWO_WELLS:
        dna = tifffile.imread(f"{entity.properties['image_directory']}/Channel2-{well}.tif")
        labels[well] = label(dna > threshold_otsu(dna))
    return drawn_nuclei(entity, folder, run_id, labels)


def materialized(result, node: str) -> dict:
    return {name: value.value for name, value in result.asset_materializations_for_node(node)[0].metadata.items()}


@pytest.mark.slow
def test_cells_grown_from_cellpose_nuclei_are_measured_and_read_out(plate, instance, bundled_model_name):
    segmented = run_job(instance, "segmentation_job", plate.entity_id, {"segmentation_masks": dict(
        cellpose_model=bundled_model_name, nuclei_channel="DNA", cytoplasm_channel="DNA", diameter="None")})
    assert segmented.success
    grown = run_job(instance, "cell_job", plate.entity_id)
    assert grown.success
    store = EntityStore()
    nuclei = store.get(materialized(segmented, "segmentation_masks")["output_entity"])
    meta = materialized(grown, "cell_masks")
    cells = store.get(meta["output_entity"])

    assert nuclei.properties["objects"] == "nuclei"
    assert {k: cells.properties[k] for k in ("objects", "method", "nuclei_channel", "cytoplasm_channel")} == {
        "objects": "cells", "method": "propagate", "nuclei_channel": 2, "cytoplasm_channel": 1}
    assert (cells.properties["nuclei_mask_entity"], cells.properties["nuclei_run_id"]) == (
        nuclei.entity_id, segmented.run_id)
    assert {(e.parent_id, e.pipeline, e.run_id) for e in store.parents(cells.entity_id)} == {
        (nuclei.entity_id, "cell-masks", grown.run_id), (plate.entity_id, "cell-masks", grown.run_id)}
    assert Path(cells.properties["mask_directory"]) == mask_root() / f"{plate.entity_id}-cells" / grown.run_id
    assert meta["method"] == "propagate" and meta["parameters"]["smoothing"] == 0.75
    assert meta["total_cells"] == cells.properties["total_cells"] == nuclei.properties["total_cells"]

    # On the conftest's BBBC014 crop of both wells every cell holds exactly its own nucleus. The issue asks for
    # cells larger than their nucleus for >= 95 %: whole fields reach 95-98 % (benchmarks/RESULTS.md), this
    # crop 88 %, because the automatic threshold is taken per field and a 160x160 crop of A01 has fewer
    # background pixels: its threshold is 11.9 where the whole field's is 6.8, and dim cells stay at their nucleus.
    # With its field's threshold the same crop reaches 100 % (imaging/test_cells.py checks >= 95 % that way).
    larger = []
    for well in TWO_WELLS:
        nucleus_labels = tifffile.imread(Path(nuclei.properties["mask_directory"]) / f"{well}_cp_masks.tif")
        cell_labels = tifffile.imread(Path(cells.properties["mask_directory"]) / f"{well}_cp_masks.tif")
        ids = np.unique(nucleus_labels[nucleus_labels > 0])
        assert np.array_equal(np.unique(cell_labels[cell_labels > 0]), ids)
        assert (cell_labels[nucleus_labels > 0] == nucleus_labels[nucleus_labels > 0]).all()
        inside = (cell_labels > 0) & (nucleus_labels > 0)
        assert (cell_labels[inside] == nucleus_labels[inside]).all()  # no cell holds another's nucleus pixels
        cell_area = np.bincount(cell_labels.ravel(), minlength=ids.max() + 1)[ids]
        nucleus_area = np.bincount(nucleus_labels.ravel(), minlength=ids.max() + 1)[ids]
        larger.append(cell_area > nucleus_area)
    assert np.concatenate(larger).mean() >= 0.85

    measured_run = run_job(instance, "measurement_job", plate.entity_id, {"assay_readout": {"min_cells": 5}})
    assert measured_run.success
    measured = store.get(materialized(measured_run, "cell_measurements")["output_entity"])
    assert measured.properties["cytoplasm"] == materialized(measured_run, "cell_measurements")["cytoplasm"] == "cell"
    assert measured.properties["cell_mask_entity"] == cells.entity_id
    assert cells.entity_id in {e.parent_id for e in store.parents(measured.entity_id)}
    table = read_parquet(measured.properties["measurement_file"])
    assert {"cell_area", "cell_eccentricity", "NFkB_cell_mean", "NFkB_ratio"} <= set(table.columns)
    assert (table["cell_area"] >= table["area"]).all()
    readout = store.get(materialized(measured_run, "assay_readout")["output_entity"])
    assert readout.properties["cytoplasm"] == materialized(measured_run, "assay_readout")["cytoplasm"] == "cell"
    # Biology: NF-kB moves into the nucleus in the stimulated well (A12), stays in the cytoplasm in A01.
    medians = table.groupby("well")["NFkB_ratio"].median()
    assert medians["A12"] > 2 * medians["A01"]


def test_measurements_use_cells_only_when_grown_from_the_current_nuclei(plate, instance, mantle_home):
    otsu_nuclei(plate, mantle_home / "otsu-1", "run-1")
    ops = {"assay_readout": {"min_cells": 5}}
    ring = run_job(instance, "measurement_job", plate.entity_id, ops)
    assert ring.success
    assert materialized(ring, "cell_measurements")["cytoplasm"] == "ring"
    assert materialized(ring, "assay_readout")["cytoplasm"] == "ring"

    grown = run_job(instance, "cell_job", plate.entity_id, {"cell_masks": {"cytoplasm_channel": "NFkB"}})
    assert grown.success
    with_cells = run_job(instance, "measurement_job", plate.entity_id, ops)
    assert with_cells.success
    store = EntityStore()
    measured = store.get(materialized(with_cells, "cell_measurements")["output_entity"])
    assert measured.properties["cytoplasm"] == "cell"
    assert measured.properties["cell_mask_entity"] == materialized(grown, "cell_masks")["output_entity"]
    assert store.get(materialized(with_cells, "assay_readout")["output_entity"]).properties["cytoplasm"] == "cell"

    otsu_nuclei(plate, mantle_home / "otsu-2", "run-2")  # segmented again: the cells belong to older nuclei
    again = run_job(instance, "measurement_job", plate.entity_id, ops)
    assert again.success
    assert materialized(again, "cell_measurements")["cytoplasm"] == "ring"
    assert "NFkB_cell_mean" not in read_parquet(
        store.get(materialized(again, "cell_measurements")["output_entity"]).properties["measurement_file"])


@pytest.mark.parametrize(
    ("config", "refusal"),
    [
        ({"cytoplasm_channel": "GFP"}, "cytoplasm_channel='GFP' names no channel; the channels are 1 NFkB"),
        ({"cytoplasm_channel": 2}, "cytoplasm_channel=2 must be a channel of its own, not 0 (grayscale) nor the "
                                   "nuclei's (2)"),
        ({"cytoplasm_channel": 3}, "cytoplasm_channel=3 but the images have 2 channel(s)"),
        ({"threshold": 50.0, "threshold_correction": 1.2}, "threshold_correction applies to the automatic threshold"),
        ({"method": "cellpose", "cellpose_model": "mantle-nuclei-v1"}, "segments nuclei in one channel"),
    ],
)
def test_a_request_that_cannot_work_fails_in_one_line_and_records_nothing(plate, instance, mantle_home, config,
                                                                           refusal):
    nuclei = otsu_nuclei(plate, mantle_home / "otsu", "run-1")
    result = run_job(instance, "cell_job", plate.entity_id, {"cell_masks": config})
    assert not result.success
    assert refusal in root_cause(result.failure_data_for_node("cell_masks"))
    assert {e.entity_id for e in EntityStore().list()} == {plate.entity_id, nuclei.entity_id}
    assert not (mask_root() / f"{plate.entity_id}-cells").exists()


def test_without_nuclei_masks_the_run_fails_and_records_nothing(plate, instance):
    result = run_job(instance, "cell_job", plate.entity_id)
    assert not result.success
    assert root_cause(result.failure_data_for_node("cell_masks")).endswith(
        f"{plate.entity_id} has no nuclei masks: materialise segmentation_masks first")
    assert [e.entity_id for e in EntityStore().list()] == [plate.entity_id]


def drawn_field(directory: Path) -> np.ndarray:
    """Three bright round cells on the NF-kB channel; on the DNA channel two nuclei in the first, one in the
    second, none in the third. Returns the nuclei labels 1, 2 (first cell) and 3 (second)."""
    rng = np.random.default_rng(0)
    shape = (128, 128)
    cytoplasm, dna, nuclei = np.full(shape, 100.0), np.zeros(shape), np.zeros(shape, np.uint16)
    for center in [(35, 35), (35, 92), (92, 64)]:
        cytoplasm[disk(center, 14, shape=shape)] = 1000.0
    for nucleus, center in enumerate([(35, 29), (35, 41), (35, 92)], start=1):
        dna[disk(center, 4, shape=shape)] = 1500.0
        nuclei[disk(center, 4, shape=shape)] = nucleus
    directory.mkdir()
    tifffile.imwrite(directory / "Channel1-01-A-01.tif", (cytoplasm + rng.normal(0, 20, shape)).astype(np.uint16))
    tifffile.imwrite(directory / "Channel2-01-A-01.tif", dna.astype(np.uint16))
    return nuclei


def test_the_cellpose_method_with_a_model_file_reports_a_cell_with_two_nuclei(
    tmp_path, instance, mantle_home, bundled_model_name
):
    nuclei = drawn_field(tmp_path / "drawn")
    entity = register(instance, tmp_path / "drawn")
    drawn_nuclei(entity, mantle_home / "drawn nuclei", "run-nuclei", {"01-A-01": nuclei})
    # The bundled weights stand in for a user's whole-cell model file, taking the path cyto3 or any file takes.
    model_file = tmp_path / "whole-cell model"
    shutil.copyfile(resolve_model(bundled_model_name).path, model_file)

    result = run_job(instance, "cell_job", entity.entity_id, {"cell_masks": dict(
        method="cellpose", cellpose_model=str(model_file), cytoplasm_channel="NFkB", nuclei_channel="DNA",
        diameter=28)})

    assert result.success
    meta = materialized(result, "cell_masks")
    cells = EntityStore().get(meta["output_entity"])
    assert cells.properties["method"] == "cellpose" and cells.properties["cellpose_model"] == str(model_file)
    (first_cell,) = cells.properties["multinucleate"]["01-A-01"]
    assert cells.properties["multinucleate"] == {"01-A-01": {first_cell: [1, 2]}}
    assert cells.properties["anucleate"] == {"01-A-01": 1}
    assert (meta["multinucleate_cells"], meta["anucleate_cells"], meta["total_cells"]) == (1, 1, 2)
    labels = tifffile.imread(Path(cells.properties["mask_directory"]) / "01-A-01_cp_masks.tif")
    # Not split: the cell with two nuclei keeps both, under the label of the first; the anucleate cell is left out.
    assert set(np.unique(labels)) == {0, 1, 3}
    assert (labels[nuclei > 0] == np.where(nuclei == 3, 3, 1)[nuclei > 0]).all()
    assert abs((labels == 1).sum() - disk((0, 0), 14)[0].size) < 0.1 * disk((0, 0), 14)[0].size


def test_the_cell_step_is_gpu_tagged_like_the_segmentation():
    cells, nuclei = defs.get_assets_def("cell_masks"), defs.get_assets_def("segmentation_masks")
    assert cells.op.tags["mantle/gpu"] == nuclei.op.tags["mantle/gpu"] == "true"
    assert cells.op.pool == nuclei.op.pool == "gpu"


def test_the_cleanup_of_ended_runs_removes_an_unrecorded_cells_folder_and_keeps_a_recorded_one(
    plate, instance, mantle_home
):
    from mantle_assets.orchestration.recovery import clean_up_ended_runs

    otsu_nuclei(plate, mantle_home / "otsu", "run-1")
    grown = run_job(instance, "cell_job", plate.entity_id, {"cell_masks": {"cytoplasm_channel": "NFkB"}})
    failed = run_job(instance, "cell_job", plate.entity_id, {"cell_masks": {"cytoplasm_channel": "GFP"}})
    assert grown.success and not failed.success
    # What a run killed after renaming its folder into place, before recording it, would leave.
    left = mask_root() / f"{plate.entity_id}-cells" / failed.run_id
    left.mkdir()

    clean_up_ended_runs(instance, [failed.run_id, grown.run_id])

    assert not left.exists()
    recorded = EntityStore().get(materialized(grown, "cell_masks")["output_entity"])
    assert sorted(p.name for p in Path(recorded.properties["mask_directory"]).iterdir()) == [
        f"{well}_cp_masks.tif" for well in TWO_WELLS]
