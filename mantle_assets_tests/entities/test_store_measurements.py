"""Per-object measurements stored with their output entity, in one transaction."""

import duckdb
import numpy as np
import pandas as pd
import pytest

from mantle_assets.entities import EntityStore


@pytest.fixture
def store_and_parent(tmp_path):
    store = EntityStore(tmp_path / "mantle.duckdb")
    folder = tmp_path / "images"
    folder.mkdir()
    return store, store.register("annotated_image_directory", "images", {"annotated_directory": folder}), folder


def objects(ratio_of_second=np.nan):
    return pd.DataFrame({
        "field": ["01-A-01", "01-A-01", "other"],
        "well": ["A01", "A01", None],
        "label": np.array([1, 2, 1], dtype=np.int64),
        "area": np.array([16, 36, 9], dtype=np.int64),
        "NFkB_ratio": [4.0, ratio_of_second, 2.0],
    })


def record(store, parent, folder, table, run_id="run-1"):
    return store.record_output(
        "annotated_image_directory", "measured", {"annotated_directory": folder}, parents=[parent.entity_id],
        pipeline="cell-measurements", run_id=run_id, parameters={}, measurements=table,
    )


def rows(store):
    with duckdb.connect(str(store.database), read_only=True) as connection:
        return connection.execute(
            "SELECT entity_id, field, label, well, measurement, value FROM cell_measurements "
            "ORDER BY field, label, measurement"
        ).fetchall()


def test_measurements_are_stored_long_and_keyed_by_entity_field_label(store_and_parent):
    store, parent, folder = store_and_parent
    output = record(store, parent, folder, objects())
    stored = rows(store)
    assert len(stored) == 3 * 2
    assert (output.entity_id, "01-A-01", 2, "A01", "NFkB_ratio", None) in stored  # NaN kept as NULL
    assert (output.entity_id, "other", 1, None, "area", 9.0) in stored


def test_a_new_version_replaces_the_rows(store_and_parent):
    store, parent, folder = store_and_parent
    first = record(store, parent, folder, objects())
    second = record(store, parent, folder, objects(ratio_of_second=5.0).iloc[1:], run_id="run-2")
    assert first.entity_id == second.entity_id and second.version == 1  # same properties: no new version
    stored = rows(store)
    assert [(r[1], r[2]) for r in stored if r[4] == "NFkB_ratio"] == [("01-A-01", 2), ("other", 1)]
    assert (second.entity_id, "01-A-01", 2, "A01", "NFkB_ratio", 5.0) in stored


def test_bad_measurements_record_nothing(store_and_parent):
    store, parent, folder = store_and_parent
    with pytest.raises(ValueError, match="must be numeric, not column"):
        record(store, parent, folder, objects().assign(note="text"))
    with pytest.raises(ValueError, match="lack column"):
        record(store, parent, folder, objects().drop(columns="well"))
    assert [e.entity_id for e in store.list()] == [parent.entity_id]
    assert store.children(parent.entity_id) == []


def plate_readout_json(z_prime, medians):
    """A readout as PlateReadout.to_json gives it, for wells A01 (negative control) and A02 (positive)."""
    return {
        "image_directory": "E000001",
        "readout": "NFkB_ratio",
        "n_cells": 120,
        "z_prime": z_prime,
        "fit": None,
        "wells": [
            {"well": well, "n_cells": 60, "median": median, "too_few_cells": False, "low_count_vs_plate": False,
             "used": median is not None, "treatment": "", "dose": dose, "control": control}
            for well, median, dose, control in zip(("A01", "A02"), medians, (0.0, 10.0), (-1.0, 1.0), strict=True)
        ],
    }


def record_readout(store, parent, folder, readout, run_id):
    return store.record_output(
        "annotated_image_directory", "read out", {"annotated_directory": folder}, parents=[parent.entity_id],
        pipeline="assay-readout", run_id=run_id, parameters={}, readout=readout,
    )


def query(store, sql):
    with duckdb.connect(str(store.database), read_only=True) as connection:
        return connection.execute(sql).fetchall()


def test_readout_rows_are_kept_per_run_and_the_views_show_the_latest(store_and_parent):
    store, parent, folder = store_and_parent
    fit = {"bottom": 1.0, "top": 5.0, "ec50": 2.0, "hill": 1.5, "ec50_ci95": [1.0, 4.0], "r_squared": 0.9,
           "n_points": 7}
    first = record_readout(store, parent, folder, plate_readout_json(0.25, (1.0, 4.0)) | {"fit": fit}, "run-1")
    record_readout(store, parent, folder, plate_readout_json(0.5, (1.5, None)), "run-2")
    record_readout(store, parent, folder, plate_readout_json(0.75, (1.25, 5.0)), "run-2")  # a retry of run-2

    assert query(store, "SELECT entity_id, run_id, image_directory, readout, n_cells, z_prime, ec50 "
                        "FROM assay_readouts ORDER BY run_id") == [
        (first.entity_id, "run-1", "E000001", "NFkB_ratio", 120, 0.25, 2.0),
        (first.entity_id, "run-2", "E000001", "NFkB_ratio", 120, 0.75, None)]
    assert query(store, "SELECT ec50, ec50_ci95_low, ec50_ci95_high, hill, bottom, top, r_squared FROM assay_readouts "
                        "WHERE run_id = 'run-1'") == [(2.0, 1.0, 4.0, 1.5, 1.0, 5.0, 0.9)]
    assert query(store, "SELECT run_id, well, dose, control, median, used FROM readout_wells "
                        "ORDER BY run_id, well") == [
        ("run-1", "A01", 0.0, -1, 1.0, True), ("run-1", "A02", 10.0, 1, 4.0, True),
        ("run-2", "A01", 0.0, -1, 1.25, True), ("run-2", "A02", 10.0, 1, 5.0, True)]
    assert query(store, "SELECT run_id, z_prime FROM current_assay_readouts") == [("run-2", 0.75)]
    assert query(store, "SELECT well, median FROM current_readout_wells ORDER BY well") == [
        ("A01", 1.25), ("A02", 5.0)]

    store.archive(first.entity_id)
    assert query(store, "SELECT count(*) FROM current_readout_wells") == [(0,)]


def test_a_readout_that_cannot_be_recorded_writes_no_rows(store_and_parent):
    store, parent, folder = store_and_parent
    record_readout(store, parent, folder, plate_readout_json(0.25, (1.0, 4.0)), "run-1")
    # Fails after run-2's lineage edge is written, inside the same transaction.
    without_plate = {k: v for k, v in plate_readout_json(0.5, (1.0, 4.0)).items() if k != "image_directory"}
    with pytest.raises(KeyError, match="image_directory"):
        record_readout(store, parent, folder, without_plate, "run-2")
    assert query(store, "SELECT run_id FROM assay_readouts") == [("run-1",)]
    assert query(store, "SELECT DISTINCT run_id FROM readout_wells") == [("run-1",)]
    assert [edge.run_id for edge in store.children(parent.entity_id)] == ["run-1"]
