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
3. Counters in a table rather than sequences (``id_counters``: the last
   entity number and property change id given out), and the views in SQL
   that PostgreSQL parses too: DuckLake has no sequences, DuckDB's postgres
   extension creates none, and PostgreSQL keeps the views of a store in it.

A new store is created at the current version directly (:func:`current_schema`),
in the dialect of its engine; the migrations bring older DuckDB files to it,
and a test checks that both end with the same schema.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from mantle_assets.entities.errors import WHAT_TO_DO_WITH_A_FOREIGN_FILE, NotAStoreError, SchemaVersionError

__all__ = ["ID_COUNTERS", "MIGRATIONS", "READOUT_WELL_COLUMNS", "SCHEMA_VERSION", "current_schema", "ensure_schema"]

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

# The rows of id_counters: entity numbers (E000001, ...) and property_history.change_id.
ID_COUNTERS = ("entity", "property_change")

# Standard SQL, which the PostgreSQL that holds the views of a store in it parses too: no QUALIFY, and json in
# lower case (DuckDB quotes type names when it passes a view on, and PostgreSQL's are case-sensitive when quoted).
_CURRENT_VIEWS: tuple[str, ...] = (
    """
    CREATE VIEW entities AS
    SELECT entity_id, data_type, name, CAST(properties AS json) AS properties,
           version, archived, created_at, updated_at
    FROM entity_records
    """,
    """
    CREATE VIEW lineage AS
    SELECT parent_id, child_id, pipeline, run_id, CAST(parameters AS json) AS parameters, created_at
    FROM lineage_edges
    """,
    """
    CREATE VIEW current_assay_readouts AS
    SELECT entity_id, run_id, image_directory, readout, n_cells, z_prime, ec50, ec50_ci95_low, ec50_ci95_high,
           hill, bottom, top, r_squared, recorded_at
    FROM (SELECT a.*, row_number() OVER (PARTITION BY a.image_directory
                                         ORDER BY a.recorded_at DESC, a.run_id DESC) AS newest
          FROM assay_readouts a JOIN entity_records e ON e.entity_id = a.entity_id AND NOT e.archived) ranked
    WHERE newest = 1
    """,
    """
    CREATE VIEW current_readout_wells AS
    SELECT w.* FROM readout_wells w JOIN current_assay_readouts c ON c.entity_id = w.entity_id AND c.run_id = w.run_id
    """,
)

_COUNTERS_TABLE = "CREATE TABLE id_counters (name VARCHAR NOT NULL, value BIGINT NOT NULL{key})"

_COUNTERS_FROM_SEQUENCES: tuple[str, ...] = (
    _COUNTERS_TABLE.format(key=", PRIMARY KEY (name)"),
    # The highest ids in use, not the sequences' values: numbers a rolled-back transaction took stay unused.
    "INSERT INTO id_counters "
    "SELECT 'entity', coalesce(max(CAST(substr(entity_id, 2) AS BIGINT)), 0) FROM entity_records "
    "UNION ALL SELECT 'property_change', coalesce(max(change_id), 0) FROM property_history",
    "DROP SEQUENCE entity_id_seq",
    "DROP SEQUENCE property_change_seq",
    "DROP VIEW current_readout_wells",
    "DROP VIEW current_assay_readouts",
    "DROP VIEW entities",
    "DROP VIEW lineage",
    *_CURRENT_VIEWS,
)

# Version -> the statements that bring a store of the version before it to it.
MIGRATIONS: dict[int, tuple[str, ...]] = {1: _ENTITY_TABLES, 2: _MEASUREMENT_TABLES, 3: _COUNTERS_FROM_SEQUENCES}
SCHEMA_VERSION = max(MIGRATIONS)

# The current tables: name, columns, primary key. In the column order that the migrations leave.
_CURRENT_TABLES: tuple[tuple[str, str, str], ...] = (
    ("schema_version", "version INTEGER NOT NULL", ""),
    ("entity_records",
     "entity_id VARCHAR NOT NULL, data_type VARCHAR NOT NULL, name VARCHAR NOT NULL, "
     "properties VARCHAR NOT NULL, version INTEGER NOT NULL, archived BOOLEAN NOT NULL, "
     "created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL", "entity_id"),
    ("property_history",
     "change_id BIGINT NOT NULL, entity_id VARCHAR NOT NULL, property VARCHAR NOT NULL, old_value VARCHAR, "
     "new_value VARCHAR, changed_at TIMESTAMP NOT NULL, run_id VARCHAR", "change_id"),
    ("lineage_edges",
     "parent_id VARCHAR NOT NULL, child_id VARCHAR NOT NULL, pipeline VARCHAR NOT NULL, run_id VARCHAR NOT NULL, "
     "parameters VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL", "parent_id, child_id, run_id"),
    ("cell_measurements",
     "entity_id VARCHAR NOT NULL, field VARCHAR NOT NULL, label BIGINT NOT NULL, well VARCHAR, "
     "measurement VARCHAR NOT NULL, value DOUBLE", "entity_id, field, label, measurement"),
    ("assay_readouts",
     "entity_id VARCHAR NOT NULL, run_id VARCHAR NOT NULL, image_directory VARCHAR NOT NULL, readout VARCHAR NOT NULL, "
     "n_cells BIGINT NOT NULL, z_prime DOUBLE, ec50 DOUBLE, ec50_ci95_low DOUBLE, ec50_ci95_high DOUBLE, "
     "hill DOUBLE, bottom DOUBLE, top DOUBLE, r_squared DOUBLE, recorded_at TIMESTAMP NOT NULL", "entity_id, run_id"),
    ("readout_wells",
     "entity_id VARCHAR NOT NULL, run_id VARCHAR NOT NULL, image_directory VARCHAR NOT NULL, well VARCHAR NOT NULL, "
     "treatment VARCHAR, dose DOUBLE, control INTEGER, n_cells BIGINT NOT NULL, median DOUBLE, "
     "too_few_cells BOOLEAN NOT NULL, low_count_vs_plate BOOLEAN NOT NULL, used BOOLEAN NOT NULL",
     "entity_id, run_id, well"),
)


def current_schema(*, constraints: bool) -> list[str]:
    """The statements that create an empty store of :data:`SCHEMA_VERSION`, what the migrations end with.

    The column meanings are those of the migrations' statements, commented there.

    Parameters
    ----------
    constraints : bool
        Whether to declare the primary keys: DuckLake supports none (there,
        each writer's transaction conflicts with a concurrent one that wrote
        the same rows instead).

    Examples
    --------
    >>> [statement for statement in current_schema(constraints=True) if "id_counters (" in statement]
    ['CREATE TABLE id_counters (name VARCHAR NOT NULL, value BIGINT NOT NULL, PRIMARY KEY (name))']
    >>> [statement for statement in current_schema(constraints=False) if "id_counters (" in statement]
    ['CREATE TABLE id_counters (name VARCHAR NOT NULL, value BIGINT NOT NULL)']
    """
    def key(columns: str) -> str:
        return f", PRIMARY KEY ({columns})" if constraints and columns else ""

    return [
        *(f"CREATE TABLE {name} ({columns}{key(primary_key)})" for name, columns, primary_key in _CURRENT_TABLES),
        _COUNTERS_TABLE.format(key=key("name")),
        "INSERT INTO id_counters VALUES " + ", ".join(f"('{counter}', 0)" for counter in ID_COUNTERS),
        *_CURRENT_VIEWS,
    ]


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
        statements = [statement for step in range(version + 1, SCHEMA_VERSION + 1) for statement in MIGRATIONS[step]]
    else:
        _refuse_foreign(connection, database)
        engine = connection.execute(
            "SELECT type FROM duckdb_databases() WHERE database_name = current_database()"
        ).fetchone()[0]
        statements = current_schema(constraints=engine != "ducklake")
    for statement in statements:
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
