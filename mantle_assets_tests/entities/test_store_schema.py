"""The store's schema versions: a store of the previous version opens, migrated with its rows."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from mantle_assets.entities import SCHEMA_VERSION, EntityNotFoundError, EntityStore
from mantle_assets_tests.entities.test_store_measurements import objects, plate_readout_json

FIXTURES = Path(__file__).parent / "fixtures"


def store_of_version(folder: Path, version: int) -> Path:
    """A DuckDB file holding what the store of a schema version wrote (see the fixture's header)."""
    database = folder / "mantle.duckdb"
    with duckdb.connect(str(database)) as connection:
        connection.execute((FIXTURES / f"store_schema_v{version}.sql").read_text())
    return database


@pytest.fixture
def version_1_store(tmp_path) -> Path:
    return store_of_version(tmp_path, 1)


@pytest.fixture
def version_2_store(tmp_path) -> Path:
    return store_of_version(tmp_path, 2)


def query(database: Path, sql: str) -> list:
    with duckdb.connect(str(database), read_only=True) as connection:
        return connection.execute(sql).fetchall()


def catalog(database: Path) -> dict[str, list]:
    """The tables' columns, constraints, views and sequences of a database: its schema, not its rows."""
    return {
        "columns": query(database, "SELECT table_name, column_name, column_index, data_type, is_nullable, "
                                   "column_default FROM duckdb_columns() WHERE NOT internal ORDER BY ALL"),
        "constraints": query(database, "SELECT table_name, constraint_type, constraint_column_names "
                                       "FROM duckdb_constraints() ORDER BY ALL"),
        "views": query(database, "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal ORDER BY ALL"),
        # Not start_value: DuckDB stores a used sequence with its next value there.
        "sequences": query(database, "SELECT sequence_name, increment_by, min_value, cycle FROM duckdb_sequences() "
                                     "ORDER BY ALL"),
    }


def test_the_fixture_is_of_the_previous_version():
    assert SCHEMA_VERSION == 3  # a new version needs a fixture of this one and a test of its migration


def test_a_version_1_store_is_migrated_keeping_its_rows(version_1_store, tmp_path):
    assert query(version_1_store, "SELECT version FROM schema_version") == [(1,)]
    store = EntityStore(version_1_store)

    measured = store.get("E000002")
    assert (measured.name, measured.version, measured.properties) == (
        "measured", 1, {"annotated_directory": "/data/measured"})
    assert [(edge.parent_id, edge.child_id, edge.run_id) for edge in store.parents("E000002")] == [
        ("E000001", "E000002", "run-1")]
    assert [(change.entity_id, change.run_id) for change in store.history("E000002")] == [("E000002", "run-1")]
    assert query(version_1_store, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert query(version_1_store, "SELECT measurement, value FROM cell_measurements ORDER BY 1") == [
        ("NFkB_ratio", 4.0), ("area", 16.0)]

    # What version 1 created only with the first readout is there, and takes one.
    assert query(version_1_store, "SELECT count(*) FROM current_readout_wells") == [(0,)]
    folder = tmp_path / "read out"
    folder.mkdir()
    readout = store.record_output(
        "annotated_image_directory", "read out", {"annotated_directory": folder}, parents=["E000001"],
        pipeline="assay-readout", run_id="run-2", parameters={}, readout=plate_readout_json(0.5, (1.0, 4.0)),
        measurements=objects(),
    )
    assert readout.entity_id == "E000003"  # the counters carry on from the old store's sequences
    assert query(version_1_store, "SELECT entity_id, run_id, z_prime FROM current_assay_readouts") == [
        ("E000003", "run-2", 0.5)]
    assert query(version_1_store, "SELECT DISTINCT entity_id FROM cell_measurements ORDER BY 1") == [
        ("E000002",), ("E000003",)]


def test_a_version_2_store_is_migrated_keeping_its_rows_and_its_ids_unique(version_2_store, tmp_path):
    readouts_before = query(version_2_store, "SELECT * FROM current_assay_readouts")
    assert readouts_before and query(version_2_store, "SELECT count(*) FROM duckdb_sequences()") == [(2,)]
    store = EntityStore(version_2_store)

    assert [entity.entity_id for entity in store.list()] == ["E000001", "E000002", "E000003"]
    assert query(version_2_store, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert query(version_2_store, "SELECT count(*) FROM duckdb_sequences()") == [(0,)]
    assert query(version_2_store, "SELECT * FROM current_assay_readouts") == readouts_before
    assert query(version_2_store, "SELECT count(*) FROM current_readout_wells") == [(2,)]
    folder = tmp_path / "new images"
    folder.mkdir()
    new = store.register("annotated_image_directory", "new", {"annotated_directory": folder})
    assert new.entity_id == "E000004"
    assert query(version_2_store, "SELECT change_id, entity_id FROM property_history ORDER BY 1") == [
        (1, "E000001"), (2, "E000002"), (3, "E000003"), (4, "E000004")]


@pytest.mark.parametrize("version", [1, 2])
def test_a_migrated_store_has_the_schema_of_a_new_one(version, tmp_path):
    old = store_of_version(tmp_path, version)
    EntityStore(old).list()
    new = tmp_path / "new.duckdb"
    EntityStore(new).list()
    migrated, created = catalog(old), catalog(new)
    assert {name for name, *_ in created["views"]} >= {"entities", "lineage", "current_readout_wells"}
    assert {table for table, *_ in created["columns"]} >= {"entity_records", "cell_measurements", "readout_wells"}
    assert migrated == created


def test_an_operation_that_fails_leaves_the_old_version_unmigrated(version_1_store):
    # The migration is part of the operation's transaction: nothing of it is written when the operation fails.
    with pytest.raises(EntityNotFoundError):
        EntityStore(version_1_store).get("E999999")
    assert query(version_1_store, "SELECT version FROM schema_version") == [(1,)]
    assert query(version_1_store, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'assay_readouts'") == [(0,)]
