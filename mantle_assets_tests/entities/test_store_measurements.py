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
