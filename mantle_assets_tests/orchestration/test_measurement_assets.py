"""cell_measurements and assay_readout end to end: real entity store, real Dagster instance, BBBC014 wells."""

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import tifffile
from dagster import AssetCheckSeverity
from skimage.filters import threshold_otsu
from skimage.measure import label

from mantle_assets.cli import root_cause
from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.imaging.assay import json_records, z_prime
from mantle_assets.orchestration.measurements import read_parquet
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.conftest import CROP, bbbc014_images, missing_data

# The demo's quick subset: the first two negative (A01, A02) and positive (A12, B12) control wells.
FOUR_WELLS = ("01-A-01", "02-A-02", "12-A-12", "24-B-12")


@pytest.fixture
def four_wells(tmp_path):
    """Four BBBC014 control wells cropped to 160x160, both channels, and the plate's layout."""
    images = bbbc014_images()
    if images is None or not (images.parent / "plate_layout.csv").is_file():
        missing_data("BBBC014 demo plate not found (set MANTLE_DEMO_DATA)")
    directory = tmp_path / "four wells"
    directory.mkdir()
    for well in FOUR_WELLS:
        for channel in (1, 2):
            pixels = tifffile.imread(images / f"Channel{channel}-{well}.tif")
            tifffile.imwrite(directory / f"Channel{channel}-{well}.tif", np.ascontiguousarray(pixels[CROP]))
    return directory, images.parent / "plate_layout.csv"


@pytest.fixture
def registered(four_wells, instance):
    directory, layout = four_wells
    entity = register_image_directory(
        EntityStore(), directory, "NF-kB", channel_names=["NFkB", "DNA"], plate_layout=layout
    )
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])
    return entity


def run_job(instance, job, entity_id, ops=None):
    return defs.resolve_job_def(job).execute_in_process(
        run_config={"ops": {name: {"config": config} for name, config in (ops or {}).items()}},
        instance=instance,
        partition_key=entity_id,
        raise_on_error=False,
    )


def checks_of(result) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def otsu_masks(entity, folder, run_id, *, empty=()):
    """Record hand-made masks (Otsu threshold of the DNA channel) as a segmentation_mask_directory entity."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for well in FOUR_WELLS:
        dna = tifffile.imread(f"{entity.properties['image_directory']}/Channel2-{well}.tif")
        labels = np.zeros(dna.shape, np.uint16) if well in empty else label(dna > threshold_otsu(dna)).astype(np.uint16)
        tifffile.imwrite(folder / f"{well}_cp_masks.tif", labels)
        counts[well] = int(labels.max())
    return EntityStore().record_output(
        "segmentation_mask_directory",
        f"{entity.name} masks",
        {"mask_directory": folder, "source_entity": entity.entity_id, "cellpose_model": "otsu", "nuclei_channel": 2,
         "cytoplasm_channel": 2, "diameter": "None", "run_id": run_id, "cells_per_field": counts},
        parents=[entity.entity_id],
        pipeline="cellpose-segmentation",
        run_id=run_id,
        parameters={},
    )


@pytest.mark.slow
def test_bundled_model_masks_to_plate_readout(registered, instance, bundled_model_name, mantle_home):
    segmented = run_job(instance, "segmentation_job", registered.entity_id, {"segmentation_masks": dict(
        cellpose_model=bundled_model_name, nuclei_channel=2, cytoplasm_channel=2, diameter="None")})
    assert segmented.success
    result = run_job(instance, "measurement_job", registered.entity_id, {"assay_readout": {"min_cells": 5}})
    assert result.success
    store = EntityStore()
    (masks,) = store.list("segmentation_mask_directory")

    measured_meta = result.asset_materializations_for_node("cell_measurements")[0].metadata
    measured = store.get(measured_meta["output_entity"].value)
    assert measured.data_type == "cell_measurement_table"
    assert {(e.parent_id, e.pipeline) for e in store.parents(measured.entity_id)} == {
        (masks.entity_id, "cell-measurements"), (registered.entity_id, "cell-measurements")}
    assert measured.properties["objects_per_field"] == masks.properties["cells_per_field"]
    table = read_parquet(measured.properties["measurement_file"])
    assert len(table) == masks.properties["total_cells"] == measured_meta["total_objects"].value
    assert {"field", "well", "label", "area", "NFkB_ratio", "DNA_nucleus_mean"} <= set(table.columns)
    assert sorted(table["well"].unique()) == ["A01", "A02", "A12", "B12"]

    with duckdb.connect(str(mantle_home / "mantle.duckdb"), read_only=True) as db:
        stored = db.execute(
            "SELECT field, label, value FROM cell_measurements WHERE entity_id = ? AND measurement = 'NFkB_ratio' "
            "ORDER BY field, label", [measured.entity_id]).df()
    expected = table.sort_values(["field", "label"])[["field", "label", "NFkB_ratio"]].reset_index(drop=True)
    assert stored["field"].tolist() == expected["field"].tolist()
    assert stored["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(stored["value"].to_numpy(float), expected["NFkB_ratio"].to_numpy(float))

    readout_meta = result.asset_materializations_for_node("assay_readout")[0].metadata
    readout = store.get(readout_meta["output_entity"].value)
    assert [e.parent_id for e in store.parents(readout.entity_id)] == [measured.entity_id]
    medians = table.groupby("well")["NFkB_ratio"].median()
    # Biology: NF-kB is nuclear in the positive controls, cytoplasmic in the negative ones.
    assert medians[["A12", "B12"]].min() > 2 * medians[["A01", "A02"]].max()
    assert readout.properties["z_prime"] == pytest.approx(z_prime(medians[["A12", "B12"]], medians[["A01", "A02"]]))
    assert "ec50" not in readout.properties and readout.properties["notes"] == {"fit": "no dose-point wells"}
    assert readout_meta["plots"].value.count("data:image/png;base64,") == 1  # heat map; no dose points to plot
    folder = mantle_home / "readouts" / registered.entity_id / result.run_id
    assert sorted(p.name for p in folder.iterdir()) == [
        "doses.csv", "doses.parquet", "plate_heatmap.png", "readout.json", "wells.csv", "wells.parquet"]
    wells = pd.read_csv(folder / "wells.csv").set_index("well")
    assert wells["n_cells"].to_dict() == table.groupby("well").size().to_dict()

    checks = checks_of(result)
    assert set(checks) == {"fields_have_objects", "ratios_within_physical_bounds", "wells_have_enough_cells"}
    assert all(c.passed and c.severity == AssetCheckSeverity.WARN for c in checks.values())

    again = run_job(instance, "measurement_job", registered.entity_id, {"assay_readout": {"min_cells": 5}})
    assert again.success
    assert {e.entity_id for e in store.list("cell_measurement_table")} == {measured.entity_id}
    assert {e.run_id for e in store.parents(measured.entity_id)} == {result.run_id, again.run_id}
    assert store.get(measured.entity_id).properties["run_id"] == again.run_id


def test_without_masks_the_run_fails_and_records_nothing(registered, instance, mantle_home):
    result = run_job(instance, "measurement_job", registered.entity_id)
    assert not result.success
    failure = result.failure_data_for_node("cell_measurements")
    assert root_cause(failure).endswith(
        f"{registered.entity_id} has no segmentation masks: materialise segmentation_masks first")
    assert [e.entity_id for e in EntityStore().list()] == [registered.entity_id]
    assert not (mantle_home / "measurements").exists() or not any((mantle_home / "measurements").rglob("*"))


def test_empty_fields_and_wells_are_warned_about(registered, instance, mantle_home):
    otsu_masks(registered, mantle_home / "otsu", "run-otsu", empty=("02-A-02",))
    result = run_job(instance, "measurement_job", registered.entity_id, {"assay_readout": {"min_cells": 5}})
    assert result.success  # warnings do not fail the run
    checks = checks_of(result)
    assert not checks["fields_have_objects"].passed
    assert checks["fields_have_objects"].metadata["empty_fields"].value == ["02-A-02"]
    assert not checks["wells_have_enough_cells"].passed
    assert checks["wells_have_enough_cells"].metadata["wells_under_half_median"].value == ["A02"]
    assert checks["ratios_within_physical_bounds"].passed
    readout = EntityStore().list("assay_readout")[0]
    assert "z_prime" not in readout.properties  # None values are not stored
    assert readout.properties["notes"]["z_prime"] == "needs two used wells of each control, got 1 negative"


def test_a_readout_of_measurements_older_than_the_masks_is_refused(registered, instance, mantle_home):
    otsu_masks(registered, mantle_home / "otsu-1", "run-1")
    assert run_job(instance, "measurement_job", registered.entity_id, {"assay_readout": {"min_cells": 5}}).success
    store = EntityStore()
    before = {e.entity_id: e.version for e in store.list()}
    masks = otsu_masks(registered, mantle_home / "otsu-2", "run-2")

    result = defs.resolve_job_def("measurement_job").execute_in_process(
        instance=instance, partition_key=registered.entity_id, raise_on_error=False,
        asset_selection=[defs.get_assets_def("assay_readout").key],
    )
    assert not result.success
    assert root_cause(result.failure_data_for_node("assay_readout")).endswith(
        f"measured older masks than {masks.entity_id} (run run-2): materialise cell_measurements again")
    assert {e.entity_id: e.version for e in store.list()} == before | {masks.entity_id: masks.version}


def test_an_unknown_readout_channel_is_named(registered, instance, mantle_home):
    otsu_masks(registered, mantle_home / "otsu", "run-otsu")
    result = run_job(instance, "measurement_job", registered.entity_id, {"assay_readout": {"readout_channel": "GFP"}})
    assert not result.success
    assert root_cause(result.failure_data_for_node("assay_readout")).endswith(
        "readout_channel 'GFP' is not one of the channels ['NFkB', 'DNA']")
    assert EntityStore().list("assay_readout") == []
    assert not (mantle_home / "readouts").exists() or not any((mantle_home / "readouts").rglob("*"))


def test_the_readout_is_queryable_in_sql_kept_as_parquet_and_shown_rounded(registered, instance, mantle_home):
    otsu_masks(registered, mantle_home / "otsu", "run-otsu")
    first = run_job(instance, "measurement_job", registered.entity_id, {"assay_readout": {"min_cells": 5}})
    second = run_job(instance, "measurement_job", registered.entity_id, {"assay_readout": {"min_cells": 5}})
    assert first.success and second.success
    (readout,) = EntityStore().list("assay_readout")
    folder = Path(readout.properties["readout_directory"])
    assert {"wells.parquet", "doses.parquet", "wells.csv"} <= {p.name for p in folder.iterdir()}
    assert json_records(read_parquet(folder / "wells.parquet")) == readout.properties["wells"]

    with duckdb.connect(str(mantle_home / "mantle.duckdb"), read_only=True) as db:
        per_run = db.execute("SELECT run_id, count(*) FROM readout_wells WHERE entity_id = ? GROUP BY run_id "
                             "ORDER BY run_id", [readout.entity_id]).fetchall()
        summary = db.execute("SELECT entity_id, run_id, readout, n_cells, z_prime FROM current_assay_readouts "
                             "WHERE image_directory = ?", [registered.entity_id]).fetchall()
        current = db.execute("SELECT well, n_cells, median, control, used FROM current_readout_wells "
                             "WHERE image_directory = ? ORDER BY well", [registered.entity_id]).fetchall()
    assert per_run == sorted([(first.run_id, 4), (second.run_id, 4)])
    z = readout.properties["z_prime"]
    assert summary == [(readout.entity_id, second.run_id, "NFkB_ratio", readout.properties["n_cells"], z)]
    assert current == [(w["well"], w["n_cells"], w["median"], w["control"], w["used"])
                       for w in readout.properties["wells"]]

    metadata = second.asset_materializations_for_node("assay_readout")[0].metadata
    assert metadata["z_prime"].value == round(z, 3) != z  # full precision stays in the entity and the tables
    assert [row.data["median"] for row in metadata["wells"].records] == [
        round(w["median"], 3) for w in readout.properties["wells"]]
