"""The entity store's tables, views and sequences, and the migrations between their versions.

A store records its version in the ``schema_version`` table. Opening one runs
the migrations above its version, in order, in the transaction of the
operation that opened it; an empty database runs them all, so a new store
and a migrated one have the same schema. Every statement is DuckDB SQL: a
store on another engine needs its own dialect of them.

Versions:

1. Entities, their property history and lineage (``entity_records``,
   ``property_history``, ``lineage_edges``; views ``entities`` and ``lineage``).
2. Per-object measurements and plate readouts (``cell_measurements``,
   ``assay_readouts``, ``readout_wells``; views ``current_assay_readouts`` and
   ``current_readout_wells``). Version 1 stores created these tables with
   their first measurements or readout, with the same definitions, which
   ``IF NOT EXISTS`` adopts with their rows.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from mantle_assets.entities.errors import WHAT_TO_DO_WITH_A_FOREIGN_FILE, NotAStoreError, SchemaVersionError

__all__ = ["MIGRATIONS", "READOUT_WELL_COLUMNS", "SCHEMA_VERSION", "ensure_schema"]

_ENTITY_TABLES: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE SEQUENCE IF NOT EXISTS entity_id_seq START 1",
    "CREATE SEQUENCE IF NOT EXISTS property_change_seq START 1",
    """
    CREATE TABLE IF NOT EXISTS entity_records (
        entity_id VARCHAR PRIMARY KEY,
        data_type VARCHAR NOT NULL,
        name VARCHAR NOT NULL,
        properties VARCHAR NOT NULL,   -- JSON text
        version INTEGER NOT NULL,
        archived BOOLEAN NOT NULL,
        created_at TIMESTAMP NOT NULL, -- UTC
        updated_at TIMESTAMP NOT NULL  -- UTC
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS property_history (
        change_id BIGINT PRIMARY KEY,  -- orders changes made in the same transaction
        entity_id VARCHAR NOT NULL,
        property VARCHAR NOT NULL,
        old_value VARCHAR,             -- JSON text, NULL when unset
        new_value VARCHAR,             -- JSON text, NULL when unset
        changed_at TIMESTAMP NOT NULL, -- UTC
        run_id VARCHAR
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS lineage_edges (
        parent_id VARCHAR NOT NULL,
        child_id VARCHAR NOT NULL,
        pipeline VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,
        parameters VARCHAR NOT NULL,   -- JSON text
        created_at TIMESTAMP NOT NULL, -- UTC
        PRIMARY KEY (parent_id, child_id, run_id)
    )
    """,
    """
    CREATE VIEW IF NOT EXISTS entities AS
    SELECT entity_id, data_type, name, CAST(properties AS JSON) AS properties,
           version, archived, created_at, updated_at
    FROM entity_records
    """,
    """
    CREATE VIEW IF NOT EXISTS lineage AS
    SELECT parent_id, child_id, pipeline, run_id, CAST(parameters AS JSON) AS parameters, created_at
    FROM lineage_edges
    """,
)

# The columns of readout_wells after its keys, in table order, as a readout's wells name them.
READOUT_WELL_COLUMNS = (
    "well", "treatment", "dose", "control", "n_cells", "median", "too_few_cells", "low_count_vs_plate", "used"
)

_MEASUREMENT_TABLES: tuple[str, ...] = (
    # Long form keeps one schema whatever the channels are called; PIVOT gives the wide table back.
    "CREATE TABLE IF NOT EXISTS cell_measurements (entity_id VARCHAR NOT NULL, field VARCHAR NOT NULL, "
    "label BIGINT NOT NULL, well VARCHAR, measurement VARCHAR NOT NULL, value DOUBLE, "
    "PRIMARY KEY (entity_id, field, label, measurement))",
    """
    CREATE TABLE IF NOT EXISTS assay_readouts (
        entity_id VARCHAR NOT NULL,        -- the assay_readout entity
        run_id VARCHAR NOT NULL,
        image_directory VARCHAR NOT NULL,  -- the plate's image_directory entity
        readout VARCHAR NOT NULL,          -- the per-object column summarised, e.g. NFkB_ratio
        n_cells BIGINT NOT NULL,
        z_prime DOUBLE,                    -- NULL when not computed (see the entity's notes)
        ec50 DOUBLE,                       -- NULL without a 4PL fit
        ec50_ci95_low DOUBLE,
        ec50_ci95_high DOUBLE,
        hill DOUBLE,
        bottom DOUBLE,
        top DOUBLE,
        r_squared DOUBLE,
        recorded_at TIMESTAMP NOT NULL,    -- UTC
        PRIMARY KEY (entity_id, run_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS readout_wells (
        entity_id VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,
        image_directory VARCHAR NOT NULL,
        well VARCHAR NOT NULL,
        treatment VARCHAR,
        dose DOUBLE,                       -- NULL for wells the plate layout does not list
        control INTEGER,                   -- -1 negative, 0 dose point, 1 positive control
        n_cells BIGINT NOT NULL,
        median DOUBLE,                     -- median readout of the well's objects
        too_few_cells BOOLEAN NOT NULL,
        low_count_vs_plate BOOLEAN NOT NULL,
        used BOOLEAN NOT NULL,             -- counted towards Z' and the fit
        PRIMARY KEY (entity_id, run_id, well)
    )
    """,
    """
    CREATE VIEW IF NOT EXISTS current_assay_readouts AS
    SELECT a.* FROM assay_readouts a JOIN entity_records e ON e.entity_id = a.entity_id AND NOT e.archived
    QUALIFY row_number() OVER (PARTITION BY a.image_directory ORDER BY a.recorded_at DESC, a.run_id DESC) = 1
    """,
    """
    CREATE VIEW IF NOT EXISTS current_readout_wells AS
    SELECT w.* FROM readout_wells w JOIN current_assay_readouts c ON c.entity_id = w.entity_id AND c.run_id = w.run_id
    """,
)

# Version -> the statements that bring a store of the version before it to it.
MIGRATIONS: dict[int, tuple[str, ...]] = {1: _ENTITY_TABLES, 2: _MEASUREMENT_TABLES}
SCHEMA_VERSION = max(MIGRATIONS)


def ensure_schema(connection: duckdb.DuckDBPyConnection, database: Path | str) -> None:
    """Bring the connection's database to :data:`SCHEMA_VERSION`, inside the caller's transaction.

    The ``schema_version`` table marks a Mantle store. A database without it
    that holds tables, views or sequences belongs to someone else and is
    refused untouched rather than filled with Mantle's tables beside its own.

    Parameters
    ----------
    connection : duckdb.DuckDBPyConnection
        In an open transaction, which the caller commits or rolls back.
    database : path or str
        The store's file or catalog, for messages.

    Raises
    ------
    SchemaVersionError
        If the store was written by a newer version of this code.
    NotAStoreError
        If the database holds something other than a Mantle store.
    """
    # The current schema rather than "main": an attached PostgreSQL catalog's is "public".
    exists = connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = current_schema() AND table_name = 'schema_version'"
    ).fetchone()[0]
    version = 0
    if exists:
        version = connection.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{database} has schema version {version}, but this mantle_assets understands "
                f"up to {SCHEMA_VERSION}; upgrade mantle_assets"
            )
        if version == SCHEMA_VERSION:
            return
    else:
        _refuse_foreign(connection, database)
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[step]:
            connection.execute(statement)
    connection.execute("DELETE FROM schema_version")
    connection.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])


def _refuse_foreign(connection: duckdb.DuckDBPyConnection, database: Path | str) -> None:
    """Raise :class:`NotAStoreError` if the database, which lacks Mantle's marker, holds anything."""
    where = "WHERE database_name = current_database() AND schema_name = current_schema()"
    names = [
        name
        for (name,) in connection.execute(
            f"SELECT table_name FROM duckdb_tables() {where} "
            f"UNION ALL SELECT view_name FROM duckdb_views() {where} AND NOT internal "
            f"UNION ALL SELECT sequence_name FROM duckdb_sequences() {where} ORDER BY 1"
        ).fetchall()
    ]
    if names:
        # repr() and a cut keep a hostile name to one short line.
        shown = ", ".join(repr(name[:40]) for name in names[:3]) + (", ..." if len(names) > 3 else "")
        raise NotAStoreError(
            f"{database} is a DuckDB database but not a Mantle entity store (it holds {shown} and no "
            f"schema_version table); {WHAT_TO_DO_WITH_A_FOREIGN_FILE}"
        )
