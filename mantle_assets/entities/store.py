"""The entity store: entities, their property history and lineage in one DuckDB file.

DuckDB lets one process at a time open a database file read-write, and while
it does, other processes cannot open it at all. Concurrent pipeline steps run
in separate processes, so every public operation here opens a short-lived
connection inside an inter-process file lock, runs one transaction and closes
the connection before releasing the lock. Nothing holds the file between
operations. People browse a copy (:meth:`EntityStore.reader`, :meth:`EntityStore.snapshot`):
a connection of theirs to the file itself would lock the pipeline out.

Beyond one machine the same store runs on any catalog DuckDB can ``ATTACH``
(``MANTLE_ENTITY_STORE=ducklake:postgres:...``, ``md:mantle``, ...): those
serialise concurrent writers themselves, so no file lock is taken, and a
write conflict surfaces as :class:`StoreBusyError`, which pipeline steps retry.
A store that no retry can mend (a full disk, a file that is not a Mantle store,
a corrupted one) raises a :class:`StoreUnusableError` instead, naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import filelock

from mantle_assets.entities.types import PropertyValidationError, get_data_type
from mantle_assets.settings import mantle_home

__all__ = [
    "SCHEMA_VERSION",
    "Entity",
    "EntityNotFoundError",
    "EntityStore",
    "LineageEdge",
    "NotAStoreError",
    "PropertyChange",
    "SchemaVersionError",
    "StoreBusyError",
    "StoreCorruptedError",
    "StoreDiskFullError",
    "StoreUnusableError",
    "default_database_path",
]

SCHEMA_VERSION = 1

_SCHEMA_STATEMENTS: tuple[str, ...] = (
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

# Created with the first readout, like cell_measurements with the first measurements, so that stores
# of schema version 1 gain them without a migration.
_READOUT_WELL_COLUMNS = (
    "well", "treatment", "dose", "control", "n_cells", "median", "too_few_cells", "low_count_vs_plate", "used"
)
_READOUT_STATEMENTS: tuple[str, ...] = (
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

_ENTITY_COLUMNS = "entity_id, data_type, name, properties, version, archived, created_at, updated_at"
_EDGE_COLUMNS = "parent_id, child_id, pipeline, run_id, parameters, created_at"

# Pseudo-property under which archiving shows up in an entity's history.
_ARCHIVED_PROPERTY = "archived"

_FIRST_RETRY_DELAY = 0.05
_MAX_RETRY_DELAY = 1.0

STORE_ENVIRONMENT_VARIABLE = "MANTLE_ENTITY_STORE"
_CATALOG_ALIAS = "mantle_store"
# "ducklake:...", "md:...", "postgres:...", "duckdb:...": DuckDB ATTACH strings, not file paths.
_CATALOG_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+_-]+:")

# Every DuckDB database file holds these bytes after its header's 8-byte checksum.
_DUCKDB_MAGIC = b"DUCK"
_DUCKDB_MAGIC_OFFSET = 8
# DuckDB reports a failed write with the C library's words for the errno.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_REASONS = tuple(os.strerror(number) for number in _DISK_FULL_ERRNOS)
# DuckDB's DataCorruptionException ("Corrupt database file: ... checksum", "Corrupted ... segment",
# "Corrupt WAL file") and its read of a file cut short.
_CORRUPTION_MARKERS = ("corrupt", "could not read enough bytes")
_NOT_DUCKDB_MARKER = "not a valid duckdb database file"
# DuckDB quotes the file names in its messages; the markers are matched without them (a folder may be "corrupt").
_QUOTED_NAME = re.compile(r'"[^"]*"')
_WHAT_TO_DO_WITH_A_FOREIGN_FILE = "it was left unchanged: point MANTLE_ENTITY_STORE at another file, or move it away"


def is_catalog_uri(database: str) -> bool:
    """Whether ``database`` names a catalog to ATTACH rather than a local DuckDB file.

    Examples
    --------
    >>> is_catalog_uri("ducklake:postgres:dbname=mantle"), is_catalog_uri("md:mantle")
    (True, True)
    >>> is_catalog_uri("/data/mantle.duckdb"), is_catalog_uri("mantle.duckdb")
    (False, False)
    """
    return bool(_CATALOG_URI.match(database))


def default_database_path() -> Path:
    """The database used when none is given.

    Returns
    -------
    Path
        ``$MANTLE_HOME/mantle.duckdb``, with ``MANTLE_HOME`` defaulting to
        ``.mantle`` in the working directory.
    """
    return mantle_home() / "mantle.duckdb"


class EntityNotFoundError(KeyError):
    """No entity has the given id."""

    def __init__(self, entity_id: str) -> None:
        super().__init__(f"no entity {entity_id}")
        self.entity_id = entity_id

    def __str__(self) -> str:
        # KeyError would quote the message.
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the message intact when the error crosses a process boundary.
        return (type(self), (self.entity_id,))


class StoreBusyError(RuntimeError):
    """The database stayed locked by another process for longer than the lock timeout."""


class StoreUnusableError(RuntimeError):
    """The database cannot be used as it is, and waiting will not change that: nothing retries it."""


class SchemaVersionError(StoreUnusableError):
    """The database was written by a newer version of the store."""


class StoreDiskFullError(StoreUnusableError):
    """The disk holding the database has no space left; the transaction was rolled back."""


class NotAStoreError(StoreUnusableError):
    """The database is not a Mantle entity store: not a DuckDB file, or a DuckDB file of other tables."""


class StoreCorruptedError(StoreUnusableError):
    """DuckDB found the database damaged (failed checksums, a truncated file)."""


@dataclass(frozen=True)
class Entity:
    """One registered thing: a folder of images, a set of masks, a model.

    Attributes
    ----------
    entity_id : str
        ``E000001``, ``E000002``, ...
    data_type : str
        Name of the entity's :class:`~mantle_assets.entities.types.DataType`.
    name : str
        Human-readable name.
    properties : dict[str, Any]
        Validated property values.
    version : int
        1 at registration, incremented by each change.
    archived : bool
        Whether the entity was archived.
    created_at, updated_at : datetime
        UTC timestamps.
    """

    entity_id: str
    data_type: str
    name: str
    properties: dict[str, Any]
    version: int
    archived: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class PropertyChange:
    """One change of one property of an entity.

    Attributes
    ----------
    entity_id : str
        The entity changed.
    property : str
        The property changed; ``"archived"`` records archiving.
    old_value, new_value : Any
        The values before and after; ``None`` when unset.
    changed_at : datetime
        UTC timestamp.
    run_id : str or None
        The run that made the change, if any.
    """

    entity_id: str
    property: str
    old_value: Any
    new_value: Any
    changed_at: datetime
    run_id: str | None


@dataclass(frozen=True)
class LineageEdge:
    """A parent entity that a pipeline run turned into a child entity.

    Attributes
    ----------
    parent_id, child_id : str
        The input and output entities.
    pipeline : str
        The pipeline that ran.
    run_id : str
        The run.
    parameters : dict[str, Any]
        The run's parameters.
    created_at : datetime
        UTC timestamp.
    """

    parent_id: str
    child_id: str
    pipeline: str
    run_id: str
    parameters: dict[str, Any]
    created_at: datetime


def _utc_now() -> datetime:
    # Stored naive in a TIMESTAMP column; the store's convention is UTC.
    return datetime.now(UTC).replace(tzinfo=None)


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


def _to_json(value: Any) -> str:
    return json.dumps(value, allow_nan=False)


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _is_foreign_lock_error(error: duckdb.Error) -> bool:
    message = str(error).lower()
    return "could not set lock" in message or "conflicting lock" in message


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _has_duckdb_header(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as file:
        file.seek(_DUCKDB_MAGIC_OFFSET)
        return file.read(len(_DUCKDB_MAGIC)) == _DUCKDB_MAGIC


def _entity_from_row(row: tuple[Any, ...]) -> Entity:
    entity_id, data_type, name, properties, version, archived, created_at, updated_at = row
    return Entity(
        entity_id=entity_id,
        data_type=data_type,
        name=name,
        properties=json.loads(properties),
        version=int(version),
        archived=bool(archived),
        created_at=_as_utc(created_at),
        updated_at=_as_utc(updated_at),
    )


def _edge_from_row(row: tuple[Any, ...]) -> LineageEdge:
    parent_id, child_id, pipeline, run_id, parameters, created_at = row
    return LineageEdge(
        parent_id=parent_id,
        child_id=child_id,
        pipeline=pipeline,
        run_id=run_id,
        parameters=json.loads(parameters),
        created_at=_as_utc(created_at),
    )


def _quoted(identifier: str) -> str:
    return '"' + str(identifier).replace('"', '""') + '"'


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


class EntityStore:
    """Entities, their property history and lineage, kept in one DuckDB file or an attached catalog.

    Safe to use from several processes at once: each operation holds an
    inter-process lock only for its own short transaction.

    Parameters
    ----------
    database : path or str, optional
        The DuckDB file, or a catalog for DuckDB to ATTACH (see
        :func:`is_catalog_uri`); if ``None``, ``$MANTLE_ENTITY_STORE`` or else
        :func:`default_database_path`. A file's folder is created on first
        use, not here.
    lock_timeout : float
        Seconds an operation waits for other processes before raising
        :class:`StoreBusyError`.
    """

    def __init__(self, database: str | os.PathLike | None = None, *, lock_timeout: float = 300.0) -> None:
        if database is None:
            database = os.environ.get(STORE_ENVIRONMENT_VARIABLE) or default_database_path()
        if str(database) == ":memory:":
            raise ValueError("EntityStore needs a database file; ':memory:' would vanish between operations")
        self._lock_timeout = float(lock_timeout)
        if is_catalog_uri(str(database)):
            self._database: Path | str = str(database)
            self._lock = None
        else:
            # Absolute now, so that a later chdir does not move the store.
            self._database = Path(os.path.abspath(os.path.expanduser(database)))
            self._lock = filelock.FileLock(str(self._database) + ".lock", timeout=self._lock_timeout)
        # The connection of the open session(), if any, that every operation reuses.
        self._session_connection: duckdb.DuckDBPyConnection | None = None

    @property
    def database(self) -> Path | str:
        """Path or str: the DuckDB file, or the attached catalog."""
        return self._database

    def __repr__(self) -> str:
        return f"EntityStore({str(self._database)!r})"

    # -- connection handling -------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Answer every operation inside the block on one connection, opened once under the lock.

        Opening the file costs more than most queries, so a sensor tick or a
        step asking several questions opens it once. Each operation still runs
        its own transaction. Other processes wait for the block to end (up to
        their lock timeout), so a session spans a tick or a few queries, never
        a run's slow work. Nested sessions share the outer one.

        Raises
        ------
        StoreBusyError
            If the lock is not free within the lock timeout.
        StoreUnusableError
            If the database cannot be opened as a Mantle store.
        """
        if self._session_connection is not None:
            yield
            return
        with self._exclusive():
            # Only opening is translated: an OSError of the caller's own work in the block is not the store's.
            with self._unusable_store_errors():
                connection = self._connect()
            self._session_connection = connection
            try:
                yield
            finally:
                self._session_connection = None
                connection.close()

    def snapshot(self, destination: str | os.PathLike) -> Path:
        """Copy the store as of its last commit to ``destination``, for reading with any DuckDB client.

        Writers are held off only while the file is copied: the copy, opened
        by a notebook or the DuckDB CLI for as long as the user likes, leaves
        the store free. Readers see the store as it was when the copy was made.
        The copy replaces ``destination`` in one rename, so a reader of an
        earlier copy keeps it unchanged.

        Parameters
        ----------
        destination : path
            The file to write; its folder must exist.

        Returns
        -------
        Path
            ``destination``, absolute.

        Raises
        ------
        ValueError
            If the store is an attached catalog, which is read directly (see :meth:`reader`).
        RuntimeError
            Inside :meth:`session`, whose open connection may hold uncheckpointed writes.
        StoreBusyError
            If the lock is not free within the lock timeout.
        StoreUnusableError
            If the database cannot be opened as a Mantle store.
        """
        if self._lock is None:
            raise ValueError(f"{self._database} is a catalog: read it directly, it admits readers beside writers")
        if self._session_connection is not None:
            raise RuntimeError("EntityStore.snapshot() cannot run inside session()")
        destination = Path(os.path.abspath(destination))
        partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
        with self._exclusive():
            # Creates an empty store's schema and refuses a foreign file; closing the connection checkpoints,
            # so the file holds every commit and no write-ahead log is left to copy.
            with self._transaction():
                pass
            try:
                shutil.copyfile(self._database, partial)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, destination)
        return destination

    @contextlib.contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for SQL over the store that neither waits for pipeline runs nor blocks them.

        A DuckDB file admits no reader beside a writer, so the connection is
        to a :meth:`snapshot` in a temporary folder, removed afterwards. An
        attached catalog admits readers beside writers and is read directly.

        Yields
        ------
        duckdb.DuckDBPyConnection
            With the store's tables and views (``entities``, ``lineage``, ...) in its current schema.
        """
        if self._lock is None:
            connection = self._attach(read_only=True)
            try:
                yield connection
            finally:
                connection.close()
            return
        with tempfile.TemporaryDirectory(prefix="mantle-sql-") as folder:
            copy = self.snapshot(Path(folder) / self._database.name)
            connection = duckdb.connect(str(copy), read_only=True)
            try:
                yield connection
            finally:
                connection.close()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The session's connection, or a connection of its own inside the lock, closed before the lock is released."""
        if self._session_connection is not None:
            yield self._session_connection
            return
        with self._exclusive():
            connection = self._connect()
            try:
                yield connection
            finally:
                connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Run one transaction on a connection of its own (see :meth:`_connection`) or the session's.

        Commits when the block finishes, rolls back when it raises; a
        connection of its own is closed before the lock is released so that
        the next process can open the file. DuckDB and OS errors that mean the
        store is unusable, wherever they arise, become a :class:`StoreUnusableError`.
        """
        with self._unusable_store_errors(), self._connection() as connection:
            connection.execute("BEGIN TRANSACTION")
            try:
                # Checked every time: it is cheap next to opening the file,
                # and the file may have been replaced since the last call.
                self._ensure_schema(connection)
                yield connection
            except BaseException:
                # Keep the real error; a session's connection must not stay inside the failed transaction.
                with contextlib.suppress(duckdb.Error):
                    connection.execute("ROLLBACK")
                raise
            try:
                connection.execute("COMMIT")
            except duckdb.TransactionException as error:
                # A full disk fails the commit with the same exception type as a write conflict.
                raise self._busy_unless_unusable(error, "write conflict on") from None

    @contextlib.contextmanager
    def _unusable_store_errors(self) -> Iterator[None]:
        """Raise the :class:`StoreUnusableError` that a DuckDB or OS error stands for; others pass unchanged."""
        try:
            yield
        except (duckdb.Error, OSError) as error:
            unusable = self._unusable(error)
            if unusable is None:
                raise
            raise unusable from None

    def _unusable(self, error: BaseException) -> StoreUnusableError | None:
        """The store error meant by ``error``, or ``None`` when it does not say the store is unusable."""
        if isinstance(error, OSError):
            words = ""
            reason = os.strerror(error.errno) if error.errno in _DISK_FULL_ERRNOS else None
        else:
            words = _QUOTED_NAME.sub('""', str(error)).lower()
            reason = next((reason for reason in _DISK_FULL_REASONS if reason.lower() in words), None)
        if reason is not None:
            return StoreDiskFullError(
                f"the disk holding {self._database} is full ({reason}); nothing was written: "
                "free some space, then run again"
            )
        if _NOT_DUCKDB_MARKER in words:
            return self._not_duckdb()
        if any(marker in words for marker in _CORRUPTION_MARKERS):
            return StoreCorruptedError(
                f"{self._database} is corrupted ({_one_line(error)}): restore it from a backup, "
                "or move it away to start an empty store"
            )
        return None

    def _busy_unless_unusable(self, error: duckdb.Error, what: str) -> Exception:
        # Errors of a busy store and of an unusable one share DuckDB's exception types; only the text tells.
        return self._unusable(error) or StoreBusyError(f"{what} {self._database}: {_one_line(error)}")

    def _not_duckdb(self) -> NotAStoreError:
        # A folder (a mistaken MANTLE_ENTITY_STORE) or an empty file holds nothing to lose: say so.
        kind = ""
        if isinstance(self._database, Path) and self._database.is_dir():
            kind = " (it is a directory)"
        elif isinstance(self._database, Path) and self._database.is_file() and not self._database.stat().st_size:
            kind = " (it is empty)"
        return NotAStoreError(f"{self._database} is not a DuckDB database{kind}; {_WHAT_TO_DO_WITH_A_FOREIGN_FILE}")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the file's inter-process lock; attached catalogs order their writers themselves."""
        if self._lock is None:
            yield
            return
        self._database.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreBusyError(
                f"timed out after {self._lock_timeout:g}s waiting for {self._lock.lock_file} "
                f"(another process is using {self._database})"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self._lock is None:
            return self._attach()
        creating = not os.path.lexists(self._database)
        # DuckDB hands a file of a format it knows (SQLite) to an extension, which it would try to
        # download, rather than refuse it; the header tells first.
        if not creating and not _has_duckdb_header(self._database):
            raise self._not_duckdb()
        # Processes that take our lock never collide here; this retry is for
        # others holding the file, such as someone's DuckDB CLI.
        deadline = time.monotonic() + self._lock_timeout
        delay = _FIRST_RETRY_DELAY
        while True:
            try:
                return duckdb.connect(str(self._database))
            except duckdb.IOException as error:
                if not _is_foreign_lock_error(error):
                    if creating:
                        # Left behind (empty, on a full disk), it would read as "not a DuckDB database".
                        self._database.unlink(missing_ok=True)
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreBusyError(
                        f"{self._database} stayed locked by another process for {self._lock_timeout:g}s: "
                        f"{_one_line(error)}"
                    ) from None
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _MAX_RETRY_DELAY)

    def _attach(self, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        connection = duckdb.connect()
        try:
            # ATTACH takes no bound parameters; the target is the operator's configuration, quoted here.
            target = str(self._database).replace("'", "''")
            connection.execute(f"ATTACH '{target}' AS {_CATALOG_ALIAS}" + (" (READ_ONLY)" if read_only else ""))
            connection.execute(f"USE {_CATALOG_ALIAS}")
        except duckdb.Error as error:
            connection.close()
            raise self._busy_unless_unusable(error, "cannot attach entity store") from None
        return connection

    def _ensure_schema(self, connection: duckdb.DuckDBPyConnection) -> None:
        """Check that the database is a Mantle store of a version this code reads; give an empty one the schema.

        The ``schema_version`` table marks a Mantle store. A database without it
        that holds tables, views or sequences belongs to someone else and is
        refused untouched rather than filled with Mantle's tables beside its own.
        """
        # The current schema rather than "main": an attached PostgreSQL catalog's is "public".
        exists = connection.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = 'schema_version'"
        ).fetchone()[0]
        if exists:
            row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0] if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self._database} has schema version {version}, but this mantle_assets understands "
                    f"up to {SCHEMA_VERSION}; upgrade mantle_assets"
                )
            if version == SCHEMA_VERSION:
                return
        else:
            self._refuse_foreign(connection)
        for statement in _SCHEMA_STATEMENTS:
            connection.execute(statement)
        connection.execute("DELETE FROM schema_version")
        connection.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])

    def _refuse_foreign(self, connection: duckdb.DuckDBPyConnection) -> None:
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
                f"{self._database} is a DuckDB database but not a Mantle entity store (it holds {shown} and no "
                f"schema_version table); {_WHAT_TO_DO_WITH_A_FOREIGN_FILE}"
            )

    # -- helpers that run inside a transaction ---------------------------------

    @staticmethod
    def _fetch(connection: duckdb.DuckDBPyConnection, entity_id: str) -> Entity:
        row = connection.execute(
            f"SELECT {_ENTITY_COLUMNS} FROM entity_records WHERE entity_id = ?", [entity_id]
        ).fetchone()
        if row is None:
            raise EntityNotFoundError(entity_id)
        return _entity_from_row(row)

    @staticmethod
    def _check_references(connection: duckdb.DuckDBPyConnection, data_type: str, properties: Mapping) -> None:
        spec = get_data_type(data_type).properties
        for prop, value in properties.items():
            if spec[prop].kind != "entity":
                continue
            found = connection.execute("SELECT 1 FROM entity_records WHERE entity_id = ?", [value]).fetchone()
            if found is None:
                raise PropertyValidationError(f"{data_type}: property {prop!r} refers to unknown entity {value}")

    @staticmethod
    def _record_change(
        connection: duckdb.DuckDBPyConnection,
        entity_id: str,
        prop: str,
        old_value: Any,
        new_value: Any,
        changed_at: datetime,
        run_id: str | None,
    ) -> None:
        connection.execute(
            "INSERT INTO property_history (change_id, entity_id, property, old_value, new_value, changed_at, run_id) "
            "VALUES (nextval('property_change_seq'), ?, ?, ?, ?, ?, ?)",
            [
                entity_id,
                prop,
                None if old_value is None else _to_json(old_value),
                None if new_value is None else _to_json(new_value),
                changed_at,
                run_id,
            ],
        )

    def _insert(
        self,
        connection: duckdb.DuckDBPyConnection,
        data_type: str,
        name: str,
        properties: dict[str, Any],
        run_id: str | None,
    ) -> Entity:
        self._check_references(connection, data_type, properties)
        # Taken last: a sequence value is not given back on rollback.
        number = connection.execute("SELECT nextval('entity_id_seq')").fetchone()[0]
        entity_id = f"E{number:06d}"
        now = _utc_now()
        connection.execute(
            f"INSERT INTO entity_records ({_ENTITY_COLUMNS}) VALUES (?, ?, ?, ?, 1, FALSE, ?, ?)",
            [entity_id, data_type, name, _to_json(properties), now, now],
        )
        for prop, value in properties.items():
            self._record_change(connection, entity_id, prop, None, value, now, run_id)
        return self._fetch(connection, entity_id)

    def _apply_changes(
        self,
        connection: duckdb.DuckDBPyConnection,
        entity: Entity,
        changes: dict[str, Any],
        run_id: str | None,
        *,
        replace: bool = False,
    ) -> Entity:
        # replace=True makes ``changes`` the complete new property set: properties it
        # lacks are removed (recorded with new value None), as a new output version needs.
        changed = {prop: value for prop, value in changes.items() if entity.properties.get(prop) != value}
        removed = [prop for prop in entity.properties if replace and prop not in changes]
        if not changed and not removed:
            return entity
        self._check_references(connection, entity.data_type, changed)
        now = _utc_now()
        merged = {prop: value for prop, value in {**entity.properties, **changed}.items() if prop not in removed}
        changed.update(dict.fromkeys(removed))
        connection.execute(
            "UPDATE entity_records SET properties = ?, version = version + 1, updated_at = ? WHERE entity_id = ?",
            [_to_json(merged), now, entity.entity_id],
        )
        for prop, value in changed.items():
            self._record_change(connection, entity.entity_id, prop, entity.properties.get(prop), value, now, run_id)
        return self._fetch(connection, entity.entity_id)

    @staticmethod
    def _find_child(
        connection: duckdb.DuckDBPyConnection, parents: Sequence[str], pipeline: str, data_type: str, name: str
    ) -> str | None:
        # Archived outputs are retired on purpose; a new run makes a fresh one.
        candidates = connection.execute(
            "SELECT DISTINCT e.entity_id FROM lineage_edges l "
            "JOIN entity_records e ON e.entity_id = l.child_id "
            "WHERE l.parent_id = ? AND l.pipeline = ? AND e.data_type = ? AND e.name = ? AND NOT e.archived "
            "ORDER BY e.entity_id",
            [parents[0], pipeline, data_type, name],
        ).fetchall()
        wanted = set(parents)
        for (child_id,) in candidates:
            rows = connection.execute(
                "SELECT DISTINCT parent_id FROM lineage_edges WHERE child_id = ? AND pipeline = ?",
                [child_id, pipeline],
            ).fetchall()
            if {parent_id for (parent_id,) in rows} == wanted:
                return child_id
        return None

    # -- public operations -----------------------------------------------------

    def register(self, data_type: str, name: str, properties: Mapping, *, run_id: str | None = None) -> Entity:
        """Create a new entity.

        Parameters
        ----------
        data_type : str
            Name of a registered data type.
        name : str
            Human-readable name.
        properties : Mapping
            Property values, validated against the data type.
        run_id : str, optional
            The run registering it, recorded in the history.

        Returns
        -------
        Entity
            The new entity, version 1.

        Raises
        ------
        UnknownDataTypeError, PropertyValidationError
            If the data type or properties are invalid; nothing is written.
        StoreBusyError
            If the database stayed locked for longer than the lock timeout.
        """
        validated = get_data_type(data_type).validate(properties)
        _check_name(name, "name")
        with self._transaction() as connection:
            return self._insert(connection, data_type, name, validated, run_id)

    def get(self, entity_id: str) -> Entity:
        """Read one entity.

        Parameters
        ----------
        entity_id : str
            E.g. ``"E000042"``.

        Returns
        -------
        Entity
            The entity, archived or not.

        Raises
        ------
        EntityNotFoundError
            If no entity has that id.
        """
        with self._transaction() as connection:
            return self._fetch(connection, entity_id)

    def list(
        self,
        data_type: str | None = None,
        *,
        include_archived: bool = False,
        entity_ids: Iterable[str] | None = None,
    ) -> list[Entity]:
        """Read all entities, or some, ordered by id, in one query.

        Parameters
        ----------
        data_type : str, optional
            Only entities of this data type.
        include_archived : bool
            Whether to include archived entities.
        entity_ids : iterable of str, optional
            Only these entities (ids that do not exist are left out).

        Returns
        -------
        list[Entity]
            The entities.
        """
        if data_type is not None:
            get_data_type(data_type)
        wanted = None if entity_ids is None else [str(entity_id) for entity_id in entity_ids]
        with self._transaction() as connection:
            rows = connection.execute(
                f"SELECT {_ENTITY_COLUMNS} FROM entity_records "
                "WHERE (? IS NULL OR data_type = ?) AND (? OR NOT archived) "
                "AND (CAST(? AS VARCHAR[]) IS NULL OR list_contains(CAST(? AS VARCHAR[]), entity_id)) "
                "ORDER BY entity_id",
                [data_type, data_type, include_archived, wanted, wanted],
            ).fetchall()
        return [_entity_from_row(row) for row in rows]

    def entity_ids(self, data_type: str | None = None, *, include_archived: bool = False) -> list[str]:
        """Read the ids of all entities, ordered: what :meth:`list` finds, without reading the properties.

        Parameters
        ----------
        data_type : str, optional
            Only entities of this data type.
        include_archived : bool
            Whether to include archived entities.

        Returns
        -------
        list[str]
            The ids.
        """
        if data_type is not None:
            get_data_type(data_type)
        with self._transaction() as connection:
            rows = connection.execute(
                "SELECT entity_id FROM entity_records WHERE (? IS NULL OR data_type = ?) AND (? OR NOT archived) "
                "ORDER BY entity_id",
                [data_type, data_type, include_archived],
            ).fetchall()
        return [entity_id for (entity_id,) in rows]

    def find(
        self, data_type: str, prop: str, values: Iterable[str], *, include_archived: bool = False
    ) -> list[Entity]:
        """Read the entities of a data type whose property has one of some values, ordered by id.

        One query, whatever the number of values, so that a caller checking many
        candidates (every folder of an inbox) does not read the whole store.

        Parameters
        ----------
        data_type : str
            The data type.
        prop : str
            One of its properties.
        values : iterable of str
            Values to look for, compared with the property's stored text: paths
            and URIs as the data type normalises them (see
            :meth:`~mantle_assets.entities.types.DataType.validate`).
        include_archived : bool
            Whether archived entities count.

        Returns
        -------
        list[Entity]
            The matching entities; empty when ``values`` is.

        Raises
        ------
        UnknownDataTypeError, PropertyValidationError
            If the data type is unknown or has no such property.
        """
        spec = get_data_type(data_type)
        if prop not in spec.properties:
            known = ", ".join(sorted(spec.properties))
            raise PropertyValidationError(f"{data_type}: unknown property {prop!r} (known: {known})")
        with self._transaction() as connection:
            rows = connection.execute(
                f"SELECT {_ENTITY_COLUMNS} FROM entity_records "
                "WHERE data_type = ? AND list_contains(CAST(? AS VARCHAR[]), json_extract_string(properties, ?)) "
                "AND (? OR NOT archived) ORDER BY entity_id",
                # A quoted JSON path: a property name is data, never part of the path syntax.
                [data_type, [str(value) for value in values], "$." + json.dumps(prop), include_archived],
            ).fetchall()
        return [_entity_from_row(row) for row in rows]

    def register_many(
        self, data_type: str, entities: Sequence[tuple[str, Mapping]], *, run_id: str | None = None
    ) -> list[Entity]:
        """Create many entities of one data type in one transaction, one statement per table.

        What :meth:`register` does for each, at the cost of one call: for
        bulk imports, where a transaction per entity would dominate.

        Parameters
        ----------
        data_type : str
            Name of a registered data type.
        entities : sequence of (str, Mapping)
            Each entity's name and property values, validated against the data type.
        run_id : str, optional
            The run registering them, recorded in the history.

        Returns
        -------
        list[Entity]
            The new entities, version 1, in the order given.

        Raises
        ------
        UnknownDataTypeError, PropertyValidationError
            If the data type or any entity's properties are invalid; nothing is written.
        """
        spec = get_data_type(data_type)
        validated = [(_check_name(name, "name"), spec.validate(properties)) for name, properties in entities]
        if not validated:
            return []
        with self._transaction() as connection:
            for _, properties in validated:
                self._check_references(connection, data_type, properties)
            numbers = connection.execute(
                "SELECT nextval('entity_id_seq') FROM range(?) ORDER BY 1", [len(validated)]
            ).fetchall()
            ids = [f"E{number:06d}" for (number,) in numbers]
            now = _utc_now()
            connection.execute(
                f"INSERT INTO entity_records ({_ENTITY_COLUMNS}) "
                "SELECT unnest(?), ?, unnest(?), unnest(?), 1, FALSE, ?, ?",
                [ids, data_type, [name for name, _ in validated],
                 [_to_json(properties) for _, properties in validated], now, now],
            )
            changes = [(entity_id, prop, _to_json(value))
                       for entity_id, (_, properties) in zip(ids, validated, strict=True)
                       for prop, value in properties.items()]
            if changes:
                # A subquery keeps the registration order of the unnested rows for the change ids.
                connection.execute(
                    "INSERT INTO property_history (change_id, entity_id, property, old_value, new_value, changed_at, "
                    "run_id) SELECT nextval('property_change_seq'), entity_id, property, NULL, new_value, ?, ? FROM ("
                    "SELECT unnest(?) AS entity_id, unnest(?) AS property, unnest(?) AS new_value)",
                    [now, run_id, *(list(column) for column in zip(*changes, strict=True))],
                )
        by_id = {entity.entity_id: entity for entity in self.list(data_type, entity_ids=ids)}
        return [by_id[entity_id] for entity_id in ids]

    def children_of(self, entity_ids: Iterable[str]) -> dict[str, list[LineageEdge]]:
        """Read the outgoing edges of many entities in one query: :meth:`children` of each.

        Parameters
        ----------
        entity_ids : iterable of str
            The parent entities; ids without children (or without an entity) map to nothing.

        Returns
        -------
        dict of str to list of LineageEdge
            Each parent's outgoing edges, oldest first, for the parents that have any.
        """
        with self._transaction() as connection:
            rows = connection.execute(
                f"SELECT {_EDGE_COLUMNS} FROM lineage_edges WHERE list_contains(CAST(? AS VARCHAR[]), parent_id) "
                "ORDER BY parent_id, created_at, child_id, run_id",
                [[str(entity_id) for entity_id in entity_ids]],
            ).fetchall()
        children: dict[str, list[LineageEdge]] = {}
        for row in rows:
            edge = _edge_from_row(row)
            children.setdefault(edge.parent_id, []).append(edge)
        return children

    def current_outputs(
        self, pipeline: str, data_type: str, parents: Iterable[str] | None = None
    ) -> dict[str, Entity]:
        """The unarchived ``data_type`` entity that ``pipeline`` made most recently from each parent, in one query.

        For each parent, the newest of its outgoing ``pipeline`` edges (by
        creation time, then child and run id) whose child is an unarchived
        ``data_type`` entity: the output a new run would replace.

        Parameters
        ----------
        pipeline : str
            The pipeline.
        data_type : str
            The outputs' data type.
        parents : iterable of str, optional
            Only these parents; all by default.

        Returns
        -------
        dict of str to Entity
            Parent id to its current output, for the parents that have one.
        """
        wanted = None if parents is None else [str(parent) for parent in parents]
        columns = ", ".join(f"e.{column.strip()}" for column in _ENTITY_COLUMNS.split(","))
        with self._transaction() as connection:
            rows = connection.execute(
                f"SELECT l.parent_id, {columns} FROM lineage_edges l JOIN entity_records e ON e.entity_id = l.child_id "
                "WHERE l.pipeline = ? AND e.data_type = ? AND NOT e.archived "
                "AND (CAST(? AS VARCHAR[]) IS NULL OR list_contains(CAST(? AS VARCHAR[]), l.parent_id)) "
                "QUALIFY row_number() OVER ("
                "  PARTITION BY l.parent_id ORDER BY l.created_at DESC, l.child_id DESC, l.run_id DESC) = 1",
                [pipeline, data_type, wanted, wanted],
            ).fetchall()
        return {row[0]: _entity_from_row(row[1:]) for row in rows}

    def ancestors(self, entity_id: str) -> list[LineageEdge]:
        """Read every edge upstream of an entity (its parents, theirs, ...), in one recursive query.

        Parameters
        ----------
        entity_id : str
            The entity.

        Returns
        -------
        list[LineageEdge]
            The edges into the entity and into each of its ancestors, oldest first.

        Raises
        ------
        EntityNotFoundError
            If no entity has that id.
        """
        return self._lineage(entity_id, "child_id", "parent_id")

    def descendants(self, entity_id: str) -> list[LineageEdge]:
        """Read every edge downstream of an entity (its children, theirs, ...), in one recursive query.

        Parameters
        ----------
        entity_id : str
            The entity.

        Returns
        -------
        list[LineageEdge]
            The edges out of the entity and out of each of its descendants, oldest first.

        Raises
        ------
        EntityNotFoundError
            If no entity has that id.
        """
        return self._lineage(entity_id, "parent_id", "child_id")

    def _lineage(self, entity_id: str, start: str, step: str) -> list[LineageEdge]:
        # start and step are the two column literals chosen above, never caller input. UNION, not
        # UNION ALL: an entity reached twice is walked once.
        with self._transaction() as connection:
            self._fetch(connection, entity_id)
            rows = connection.execute(
                f"WITH RECURSIVE reached(entity_id) AS (SELECT CAST(? AS VARCHAR) UNION "
                f"SELECT l.{step} FROM lineage_edges l JOIN reached r ON l.{start} = r.entity_id) "
                f"SELECT {_EDGE_COLUMNS} FROM lineage_edges WHERE {start} IN (SELECT entity_id FROM reached) "
                "ORDER BY created_at, parent_id, child_id, run_id",
                [entity_id],
            ).fetchall()
        return [_edge_from_row(row) for row in rows]

    def update(self, entity_id: str, changes: Mapping, *, run_id: str | None = None) -> Entity:
        """Change some properties of an entity.

        Parameters
        ----------
        entity_id : str
            The entity to change.
        changes : Mapping
            New property values, validated as a partial set; ``None`` values
            of optional properties are ignored.
        run_id : str, optional
            The run making the change, recorded in the history.

        Returns
        -------
        Entity
            The entity after the change; its version is incremented if any
            value actually changed.

        Raises
        ------
        EntityNotFoundError
            If no entity has that id.
        PropertyValidationError
            If a change is invalid; nothing is written.
        """
        with self._transaction() as connection:
            entity = self._fetch(connection, entity_id)
            validated = get_data_type(entity.data_type).validate(changes, partial=True)
            return self._apply_changes(connection, entity, validated, run_id)

    def archive(self, entity_id: str, *, run_id: str | None = None) -> Entity:
        """Mark an entity archived, hiding it from :meth:`list` by default.

        Parameters
        ----------
        entity_id : str
            The entity to archive.
        run_id : str, optional
            The run archiving it, recorded in the history as a change of the
            pseudo-property ``"archived"``.

        Returns
        -------
        Entity
            The archived entity; unchanged if it already was archived.

        Raises
        ------
        EntityNotFoundError
            If no entity has that id.
        """
        with self._transaction() as connection:
            entity = self._fetch(connection, entity_id)
            if entity.archived:
                return entity
            now = _utc_now()
            connection.execute(
                "UPDATE entity_records SET archived = TRUE, version = version + 1, updated_at = ? "
                "WHERE entity_id = ?",
                [now, entity_id],
            )
            self._record_change(connection, entity_id, _ARCHIVED_PROPERTY, False, True, now, run_id)
            return self._fetch(connection, entity_id)

    def history(self, entity_id: str) -> list[PropertyChange]:
        """Read the property changes of an entity, oldest first.

        Parameters
        ----------
        entity_id : str
            The entity.

        Returns
        -------
        list[PropertyChange]
            One entry per changed property, starting with the values set at
            registration (``old_value`` ``None``).

        Raises
        ------
        EntityNotFoundError
            If no entity has that id.
        """
        with self._transaction() as connection:
            self._fetch(connection, entity_id)
            rows = connection.execute(
                "SELECT entity_id, property, old_value, new_value, changed_at, run_id "
                "FROM property_history WHERE entity_id = ? ORDER BY change_id",
                [entity_id],
            ).fetchall()
        return [
            PropertyChange(
                entity_id=row[0],
                property=row[1],
                old_value=_from_json(row[2]),
                new_value=_from_json(row[3]),
                changed_at=_as_utc(row[4]),
                run_id=row[5],
            )
            for row in rows
        ]

    def record_output(
        self,
        data_type: str,
        name: str,
        properties: Mapping,
        *,
        parents: Sequence[str],
        pipeline: str,
        run_id: str,
        parameters: Mapping,
        measurements: Any = None,
        readout: Mapping | None = None,
        before_writing: Callable[[], None] | None = None,
    ) -> Entity:
        """Record what a pipeline run made from some parent entities, in one transaction.

        If an unarchived entity of ``data_type`` already descends from
        exactly ``parents`` via ``pipeline``, its properties are updated
        (history rows, version incremented if anything changed) and its name
        is kept; otherwise a new entity is registered. Then one lineage edge
        per parent is added, unless the same (parent, child, run) edge exists,
        so a retried run does not duplicate anything.

        Parameters
        ----------
        data_type : str
            Data type of the output.
        name : str
            Name for a new output entity.
        properties : Mapping
            The output's properties, validated in full.
        parents : Sequence[str]
            Ids of the input entities; at least one, all existing.
        pipeline : str
            Name of the pipeline.
        run_id : str
            The run.
        parameters : Mapping
            The run's JSON-serialisable parameters, stored on the edges.
        measurements : pandas.DataFrame, optional
            Per-object measurements of the output (columns ``field``, ``label``,
            ``well`` and numeric measurements), stored in the same transaction
            in the ``cell_measurements`` table, one row per (output, field,
            label, measurement), replacing the output's earlier rows.
        readout : Mapping, optional
            A plate readout of the output: ``image_directory`` (the plate's
            entity id) and what :meth:`~mantle_assets.imaging.assay.PlateReadout.to_json`
            gives (``readout``, ``n_cells``, ``z_prime``, ``fit``, ``wells``).
            Stored in the same transaction as one ``assay_readouts`` row and
            one ``readout_wells`` row per well, keyed by output and ``run_id``:
            a retried run replaces its own rows, older runs' rows stay (see
            :meth:`_record_readout`).
        before_writing : callable, optional
            Called with no argument inside the transaction, under the store's
            lock, before anything is written; an exception from it ends the
            record with nothing written. For checks that must be as late as
            possible, such as whether the run is still wanted.

        Returns
        -------
        Entity
            The new or updated output entity.

        Raises
        ------
        EntityNotFoundError
            If a parent does not exist; nothing is written.
        UnknownDataTypeError, PropertyValidationError
            If the data type or properties are invalid; nothing is written.
        ValueError
            If ``parents`` is empty or ``parameters`` is not JSON-serialisable.
        """
        validated = get_data_type(data_type).validate(properties)
        _check_name(name, "name")
        _check_name(pipeline, "pipeline")
        _check_name(run_id, "run_id")
        if isinstance(parents, str):
            raise ValueError(f"parents must be a sequence of entity ids, got the string {parents!r}")
        unique_parents = list(dict.fromkeys(parents))
        if not unique_parents:
            raise ValueError(f"record_output for pipeline {pipeline!r} needs at least one parent")
        try:
            parameters_json = _to_json(dict(parameters))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"parameters of pipeline {pipeline!r} are not JSON-serialisable: {_one_line(error)}"
            ) from None

        with self._transaction() as connection:
            if before_writing is not None:
                before_writing()
            for parent_id in unique_parents:
                self._fetch(connection, parent_id)
            child_id = self._find_child(connection, unique_parents, pipeline, data_type, name)
            if child_id is None:
                child = self._insert(connection, data_type, name, validated, run_id)
            else:
                child = self._apply_changes(
                    connection, self._fetch(connection, child_id), validated, run_id, replace=True
                )
            now = _utc_now()
            for parent_id in unique_parents:
                connection.execute(
                    f"INSERT INTO lineage_edges ({_EDGE_COLUMNS}) "
                    "SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS ("
                    "  SELECT 1 FROM lineage_edges WHERE parent_id = ? AND child_id = ? AND run_id = ?)",
                    [parent_id, child.entity_id, pipeline, run_id, parameters_json, now,
                     parent_id, child.entity_id, run_id],
                )
            if measurements is not None:
                self._replace_measurements(connection, child.entity_id, measurements)
            if readout is not None:
                self._record_readout(connection, child.entity_id, run_id, readout)
            return child

    @staticmethod
    def _replace_measurements(connection: duckdb.DuckDBPyConnection, entity_id: str, table: Any) -> None:
        # Long form keeps one schema whatever the channels are called; PIVOT gives the wide table back.
        keys = ("field", "label", "well")
        missing = [key for key in keys if key not in table.columns]
        if missing:
            raise ValueError(f"measurements of {entity_id} lack column(s) {', '.join(missing)}")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS cell_measurements (entity_id VARCHAR NOT NULL, field VARCHAR NOT NULL, "
            "label BIGINT NOT NULL, well VARCHAR, measurement VARCHAR NOT NULL, value DOUBLE, "
            "PRIMARY KEY (entity_id, field, label, measurement))"
        )
        connection.execute("DELETE FROM cell_measurements WHERE entity_id = ?", [entity_id])
        values = [column for column in table.columns if column not in keys]
        not_numeric = [column for column in values if table[column].dtype.kind not in "biuf"]
        if not_numeric:
            raise ValueError(f"measurements of {entity_id} must be numeric, not column(s) {', '.join(not_numeric)}")
        if table.empty or not values:
            return
        # Registered on this short-lived connection only; it goes when the connection closes.
        connection.register("new_measurements", table)
        connection.execute(
            "INSERT INTO cell_measurements SELECT ?, field, label, well, measurement, value FROM new_measurements "
            f"UNPIVOT INCLUDE NULLS (value FOR measurement IN ({', '.join(_quoted(column) for column in values)}))",
            [entity_id],
        )

    @staticmethod
    def _record_readout(connection: duckdb.DuckDBPyConnection, entity_id: str, run_id: str, readout: Mapping) -> None:
        """Write a run's plate readout as rows of ``assay_readouts`` and ``readout_wells``.

        EC50 and Z' are columns of a table written with the run rather than a
        view over the entity's properties: the properties hold only the
        latest run's values, while rows keyed by (entity, run) keep every
        run's, so a plate's Z' across reruns and the wells behind each value
        are plain queries. Both are written in the transaction that records
        the entity, so a run that fails records neither. The views
        ``current_assay_readouts`` and ``current_readout_wells`` keep, per
        image directory, the latest run of its unarchived readouts.
        """
        for statement in _READOUT_STATEMENTS:
            connection.execute(statement)
        for table in ("assay_readouts", "readout_wells"):
            connection.execute(f"DELETE FROM {table} WHERE entity_id = ? AND run_id = ?", [entity_id, run_id])
        fit = readout.get("fit") or {}
        low, high = fit.get("ec50_ci95") or (None, None)
        connection.execute(
            "INSERT INTO assay_readouts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [entity_id, run_id, readout["image_directory"], readout["readout"], readout["n_cells"],
             readout.get("z_prime"), fit.get("ec50"), low, high, fit.get("hill"), fit.get("bottom"), fit.get("top"),
             fit.get("r_squared"), _utc_now()],
        )
        wells = readout["wells"]
        if not wells:
            return
        # One statement for all wells: unnested parallel lists, in the table's column order.
        columns = [[well.get(column) for well in wells] for column in _READOUT_WELL_COLUMNS]
        connection.execute(
            f"INSERT INTO readout_wells SELECT ?, ?, ?, {', '.join('unnest(?)' for _ in columns)}",
            [entity_id, run_id, readout["image_directory"], *columns],
        )

    def parents(self, entity_id: str) -> list[LineageEdge]:
        """Read the edges from which an entity was made.

        Parameters
        ----------
        entity_id : str
            The child entity.

        Returns
        -------
        list[LineageEdge]
            Its incoming edges, oldest first; one per parent and run.

        Raises
        ------
        EntityNotFoundError
            If no entity has that id.
        """
        return self._edges(entity_id, "child_id")

    def children(self, entity_id: str) -> list[LineageEdge]:
        """Read the edges to the entities made from an entity.

        Parameters
        ----------
        entity_id : str
            The parent entity.

        Returns
        -------
        list[LineageEdge]
            Its outgoing edges, oldest first; one per child and run.

        Raises
        ------
        EntityNotFoundError
            If no entity has that id.
        """
        return self._edges(entity_id, "parent_id")

    def _edges(self, entity_id: str, column: str) -> list[LineageEdge]:
        # column is one of two literals chosen above, never caller input.
        order = "parent_id" if column == "child_id" else "child_id"
        with self._transaction() as connection:
            self._fetch(connection, entity_id)
            rows = connection.execute(
                f"SELECT {_EDGE_COLUMNS} FROM lineage_edges WHERE {column} = ? "
                f"ORDER BY created_at, {order}, run_id",
                [entity_id],
            ).fetchall()
        return [_edge_from_row(row) for row in rows]

    def outputs_of_runs(self, run_ids: Iterable[str]) -> dict[str, list[Entity]]:
        """The entities some runs recorded as outputs (children of their lineage edges), in one query.

        Recovery keeps a folder an ended run wrote only if one of these records it: a folder
        renamed into place by a run killed before it recorded belongs to no entity.

        Parameters
        ----------
        run_ids : iterable of str
            Dagster run ids; unknown ones map to nothing.

        Returns
        -------
        dict[str, list[Entity]]
            For each run that recorded outputs, those entities (archived ones included), by id.
        """
        wanted = sorted({str(run_id) for run_id in run_ids})
        if not wanted:
            return {}
        with self._transaction() as connection:
            rows = connection.execute(
                "SELECT DISTINCT edges.run_id, "
                f"{', '.join(f'records.{c.strip()}' for c in _ENTITY_COLUMNS.split(','))} "
                "FROM lineage_edges AS edges JOIN entity_records AS records ON records.entity_id = edges.child_id "
                "WHERE list_contains(CAST(? AS VARCHAR[]), edges.run_id) ORDER BY edges.run_id, records.entity_id",
                [wanted],
            ).fetchall()
        outputs: dict[str, list[Entity]] = {}
        for run_id, *entity in rows:
            outputs.setdefault(run_id, []).append(_entity_from_row(tuple(entity)))
        return outputs
