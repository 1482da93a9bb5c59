"""Where the entity store lives and how it is opened: DuckDB file or attached catalog, lock, transactions.

DuckDB lets one process at a time open a database file read-write, and while
it does, other processes cannot open it at all. Concurrent pipeline steps run
in separate processes, so every operation opens a short-lived connection
inside an inter-process file lock, runs one transaction and closes the
connection before releasing the lock. Nothing holds the file between
operations. People browse a copy (:meth:`StoreDatabase.reader`,
:meth:`StoreDatabase.snapshot`): a connection of theirs to the file itself
would lock the pipeline out.

Beyond one machine the same store runs on any catalog DuckDB can ``ATTACH``
(``MANTLE_ENTITY_STORE=ducklake:postgres:...``, ``md:mantle``, ...): those
serialise concurrent writers themselves, so no file lock is taken: a
transaction that conflicts with a concurrent writer's is rerun
(:meth:`StoreDatabase.run`) until the lock timeout, then raises
:class:`StoreConflictError`, a :class:`StoreBusyError`, which pipeline steps
retry. Their extensions (``ducklake``, ``postgres``, ``sqlite``) load from the
``duckdb-ext-*`` packages, with no download.
A store that no retry can mend (a full disk, a file that is not a Mantle store,
a corrupted one) raises a :class:`StoreUnusableError` instead, naming the file.

Every transaction first brings the schema to its current version
(:func:`mantle_assets.entities.schema.ensure_schema`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import duckdb
import filelock

from mantle_assets.entities.errors import (
    WHAT_TO_DO_WITH_A_FOREIGN_FILE,
    NotAStoreError,
    StoreBusyError,
    StoreConflictError,
    StoreCorruptedError,
    StoreDiskFullError,
    StoreUnusableError,
)
from mantle_assets.entities.schema import ensure_schema
from mantle_assets.settings import mantle_home

__all__ = [
    "DATA_PATH_ENVIRONMENT_VARIABLE",
    "STORE_ENVIRONMENT_VARIABLE",
    "StoreDatabase",
    "default_database_path",
    "is_catalog_uri",
    "sql_literal",
]

Result = TypeVar("Result")

_FIRST_RETRY_DELAY = 0.05
_MAX_RETRY_DELAY = 1.0

STORE_ENVIRONMENT_VARIABLE = "MANTLE_ENTITY_STORE"
# Where a DuckLake catalog keeps its Parquet files: a folder or an object-store prefix that every writer reaches.
DATA_PATH_ENVIRONMENT_VARIABLE = "MANTLE_ENTITY_STORE_DATA_PATH"
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
_NO_DATA_PATH_MARKER = "data_path is not set"
# A concurrent writer's transaction won: DuckLake's commit check, PostgreSQL's REPEATABLE READ (which DuckDB's
# postgres extension uses), its deadlock detector, and its unique keys hit by two inserts of the same row.
_CONFLICT_MARKERS = (
    "transaction conflict",
    "could not serialize access",
    "deadlock detected",
    "duplicate key value violates unique constraint",
)
# DuckDB quotes the file names in its messages; the markers are matched without them (a folder may be "corrupt").
_QUOTED_NAME = re.compile(r'"[^"]*"')


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


def utc_now() -> datetime:
    """Now, naive: the store keeps UTC in TIMESTAMP columns."""
    return datetime.now(UTC).replace(tzinfo=None)


# libpq's "password=..." (quoted or not) and a URI's "user:password@": kept out of every message and listing.
_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)|(://[^:/@\s]*:)[^@\s]+(@)", re.IGNORECASE)


def without_password(text: str) -> str:
    """``text`` with the passwords of connection strings in it masked.

    Examples
    --------
    >>> without_password("postgres:dbname=mantle host=db user=mantle password=s3cret")
    'postgres:dbname=mantle host=db user=mantle password=***'
    >>> without_password("ducklake:postgres:postgresql://mantle:s3cret@db/mantle")
    'ducklake:postgres:postgresql://mantle:***@db/mantle'
    """
    return _PASSWORD.sub(lambda m: f"{m[1]}***" if m[1] else f"{m[3]}***{m[4]}", text)


def one_line(error: BaseException) -> str:
    """The error's message on one line, without passwords."""
    return without_password(" ".join(str(error).split()))


def _is_foreign_lock_error(error: duckdb.Error) -> bool:
    message = str(error).lower()
    return "could not set lock" in message or "conflicting lock" in message


def _is_conflict(error: duckdb.Error) -> bool:
    message = str(error).lower()
    return any(marker in message for marker in _CONFLICT_MARKERS)


def _has_duckdb_header(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as file:
        file.seek(_DUCKDB_MAGIC_OFFSET)
        return file.read(len(_DUCKDB_MAGIC)) == _DUCKDB_MAGIC


class StoreDatabase:
    """The entity store's DuckDB file or attached catalog: connections, the lock and transactions.

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
            # What messages, listings and repr show; the catalog itself is attached from _catalog.
            self.location: Path | str = without_password(str(database))
            self._catalog = str(database)
            self._lock = None
        else:
            # Absolute now, so that a later chdir does not move the store.
            self.location = Path(os.path.abspath(os.path.expanduser(database)))
            self._lock = filelock.FileLock(str(self.location) + ".lock", timeout=self._lock_timeout)
        # The connection of the open session(), if any, that every operation reuses.
        self._session_connection: duckdb.DuckDBPyConnection | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Answer every transaction inside the block on one connection, opened once under the lock.

        See :meth:`mantle_assets.entities.store.EntityStore.session`.
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
                self._close(connection)

    def snapshot(self, destination: str | os.PathLike) -> Path:
        """Copy the store as of its last commit to ``destination``.

        See :meth:`mantle_assets.entities.store.EntityStore.snapshot`.
        """
        if self._lock is None:
            raise ValueError(f"{self.location} is a catalog: read it directly, it admits readers beside writers")
        if self._session_connection is not None:
            raise RuntimeError("EntityStore.snapshot() cannot run inside session()")
        destination = Path(os.path.abspath(destination))
        partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
        with self._exclusive():
            # Creates an empty store's schema and refuses a foreign file; closing the connection checkpoints,
            # so the file holds every commit and no write-ahead log is left to copy.
            with self.transaction():
                pass
            try:
                shutil.copyfile(self.location, partial)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, destination)
        return destination

    @contextlib.contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection that neither waits for pipeline runs nor blocks them.

        See :meth:`mantle_assets.entities.store.EntityStore.reader`.
        """
        if self._lock is None:
            connection = self._attach(read_only=True)
            try:
                yield connection
            finally:
                self._close(connection)
            return
        with tempfile.TemporaryDirectory(prefix="mantle-sql-") as folder:
            copy = self.snapshot(Path(folder) / self.location.name)
            connection = duckdb.connect(str(copy), read_only=True)
            try:
                yield connection
            finally:
                connection.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
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
                ensure_schema(connection, self.location)
                yield connection
            except BaseException:
                # Keep the real error; a session's connection must not stay inside the failed transaction.
                with contextlib.suppress(duckdb.Error):
                    connection.execute("ROLLBACK")
                raise
            try:
                connection.execute("COMMIT")
            except duckdb.Error as error:
                if _is_conflict(error):
                    raise self._conflict(error) from None
                if not isinstance(error, duckdb.TransactionException):
                    raise
                # A full disk fails the commit with the same exception type as a write conflict.
                raise self._busy_unless_unusable(error, "write conflict on") from None

    def run(self, work: Callable[[duckdb.DuckDBPyConnection], Result]) -> Result:
        """Run ``work`` in one :meth:`transaction`, again while a concurrent writer's transaction wins over it.

        Only shared catalogs conflict; the file lock keeps writers to a DuckDB
        file apart. ``work`` must do nothing outside the transaction that a
        rerun would repeat.

        Raises
        ------
        StoreConflictError
            If it still conflicts after the lock timeout.
        """
        deadline = time.monotonic() + self._lock_timeout
        delay = _FIRST_RETRY_DELAY
        while True:
            try:
                with self.transaction() as connection:
                    return work(connection)
            except StoreConflictError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                # Random: writers that conflicted together would otherwise rerun together.
                time.sleep(min(random.uniform(0, delay), remaining))
                delay = min(delay * 2, _MAX_RETRY_DELAY)

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
                self._close(connection)

    def _close(self, connection: duckdb.DuckDBPyConnection) -> None:
        # An attached catalog is detached first: closing with it attached leaves its own connections to end
        # (DuckLake's to PostgreSQL) at interpreter exit, where they fail.
        if self._lock is None:
            with contextlib.suppress(duckdb.Error):
                connection.execute("USE memory")
                connection.execute(f"DETACH {_CATALOG_ALIAS}")
        connection.close()

    @contextlib.contextmanager
    def _unusable_store_errors(self) -> Iterator[None]:
        """Raise the :class:`StoreUnusableError` that a DuckDB or OS error stands for; others pass unchanged."""
        try:
            yield
        except (duckdb.Error, OSError) as error:
            if isinstance(error, duckdb.Error) and _is_conflict(error):
                raise self._conflict(error) from None
            unusable = self._unusable(error)
            if unusable is None:
                raise
            raise unusable from None

    def _conflict(self, error: duckdb.Error) -> StoreConflictError:
        return StoreConflictError(f"a concurrent writer changed {self.location} first: {one_line(error)}")

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
                f"the disk holding {self.location} is full ({reason}); nothing was written: "
                "free some space, then run again"
            )
        if _NOT_DUCKDB_MARKER in words:
            return self._not_duckdb()
        if any(marker in words for marker in _CORRUPTION_MARKERS):
            return StoreCorruptedError(
                f"{self.location} is corrupted ({one_line(error)}): restore it from a backup, "
                "or move it away to start an empty store"
            )
        return None

    def _busy_unless_unusable(self, error: duckdb.Error, what: str) -> Exception:
        # Errors of a busy store and of an unusable one share DuckDB's exception types; only the text tells.
        return self._unusable(error) or StoreBusyError(f"{what} {self.location}: {one_line(error)}")

    def _not_duckdb(self) -> NotAStoreError:
        # A folder (a mistaken MANTLE_ENTITY_STORE) or an empty file holds nothing to lose: say so.
        kind = ""
        if isinstance(self.location, Path) and self.location.is_dir():
            kind = " (it is a directory)"
        elif isinstance(self.location, Path) and self.location.is_file() and not self.location.stat().st_size:
            kind = " (it is empty)"
        return NotAStoreError(f"{self.location} is not a DuckDB database{kind}; {WHAT_TO_DO_WITH_A_FOREIGN_FILE}")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the file's inter-process lock; attached catalogs order their writers themselves."""
        if self._lock is None:
            yield
            return
        self.location.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreBusyError(
                f"timed out after {self._lock_timeout:g}s waiting for {self._lock.lock_file} "
                f"(another process is using {self.location})"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self._lock is None:
            return self._attach()
        creating = not os.path.lexists(self.location)
        # DuckDB hands a file of a format it knows (SQLite) to an extension, which it would try to
        # download, rather than refuse it; the header tells first.
        if not creating and not _has_duckdb_header(self.location):
            raise self._not_duckdb()
        # Processes that take our lock never collide here; this retry is for
        # others holding the file, such as someone's DuckDB CLI.
        deadline = time.monotonic() + self._lock_timeout
        delay = _FIRST_RETRY_DELAY
        while True:
            try:
                return duckdb.connect(str(self.location))
            except duckdb.IOException as error:
                if not _is_foreign_lock_error(error):
                    if creating:
                        # Left behind (empty, on a full disk), it would read as "not a DuckDB database".
                        self.location.unlink(missing_ok=True)
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreBusyError(
                        f"{self.location} stayed locked by another process for {self._lock_timeout:g}s: "
                        f"{one_line(error)}"
                    ) from None
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _MAX_RETRY_DELAY)

    def _attach(self, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        import duckdb_ext

        # The packaged extensions, never a download: a server without a network attaches the same.
        # No progress bar: a query of a busy catalog may run long enough for DuckDB to draw one on the step's output.
        connection = duckdb.connect(config={
            "extension_directory": duckdb_ext.get_extension_dir(), "autoinstall_known_extensions": False})
        connection.execute("SET enable_progress_bar = false")
        options = ["READ_ONLY"] if read_only else []
        data_path = os.environ.get(DATA_PATH_ENVIRONMENT_VARIABLE)
        if data_path and self._catalog.startswith("ducklake:"):
            options.append(f"DATA_PATH {_quoted(data_path)}")
        try:
            # ATTACH takes no bound parameters; the target is the operator's configuration, quoted here.
            connection.execute(
                f"ATTACH {_quoted(self._catalog)} AS {_CATALOG_ALIAS}"
                + (f" ({', '.join(options)})" if options else "")
            )
            connection.execute(f"USE {_CATALOG_ALIAS}")
        except duckdb.Error as error:
            connection.close()
            if _is_conflict(error):
                raise self._conflict(error) from None
            if _NO_DATA_PATH_MARKER in str(error).lower():
                raise StoreUnusableError(
                    f"{self.location} is a new DuckLake catalog: set {DATA_PATH_ENVIRONMENT_VARIABLE} to the folder "
                    "or object-store prefix for its data files, one that every writer reaches"
                ) from None
            raise self._busy_unless_unusable(error, "cannot attach entity store") from None
        return connection


def _quoted(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def sql_literal(value: str | int | bool | list[str] | None) -> str:
    """``value`` as a DuckDB SQL literal, for the queries that bind no parameter.

    DuckDB 1.4 imports pandas (a quarter of a second) when it binds any
    Python parameter; the reads behind ``mantle entities`` and ``mantle
    show`` put their values in the text instead. A DuckDB string literal
    has one escape, the doubled quote.

    Examples
    --------
    >>> sql_literal("it's"), sql_literal(None), sql_literal(False), sql_literal(7)
    ("'it''s'", 'NULL', 'FALSE', '7')
    >>> print(sql_literal(["E000001", "x'"]))
    CAST(['E000001', 'x'''] AS VARCHAR[])
    """
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, list):
        return f"CAST([{', '.join(sql_literal(str(item)) for item in value)}] AS VARCHAR[])"
    if isinstance(value, str):
        if "\0" in value:
            raise ValueError(f"{value[:40]!r} holds a NUL character, which no entity's text holds")
        return _quoted(value)
    raise TypeError(f"no SQL literal for {type(value).__name__}")
