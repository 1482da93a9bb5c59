"""The entity store: entities, their property history and lineage, and the outputs pipeline runs record.

Framework-free: :class:`EntityStore` is what the Dagster layer and the CLI
use. How the database is opened, locked and kept to its schema lives in
:mod:`mantle_assets.entities.database` and :mod:`mantle_assets.entities.schema`;
the measurement and readout rows an output carries in
:mod:`mantle_assets.entities.measurement_tables`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from mantle_assets.entities.database import StoreDatabase, one_line, sql_literal, utc_now
from mantle_assets.entities.errors import EntityNotFoundError
from mantle_assets.entities.measurement_tables import record_readout, replace_measurements
from mantle_assets.entities.types import PropertyValidationError, get_data_type

__all__ = [
    "Entity",
    "EntityNotFoundError",
    "EntityStore",
    "LineageEdge",
    "PropertyChange",
]

_ENTITY_COLUMNS = "entity_id, data_type, name, properties, version, archived, created_at, updated_at"
_EDGE_COLUMNS = "parent_id, child_id, pipeline, run_id, parameters, created_at"

# Pseudo-property under which archiving shows up in an entity's history.
_ARCHIVED_PROPERTY = "archived"


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

    def to_json(self) -> dict[str, Any]:
        """The entity as JSON values, times in ISO 8601: what ``mantle`` prints with ``--json``."""
        return {
            "entity_id": self.entity_id,
            "data_type": self.data_type,
            "name": self.name,
            "version": self.version,
            "archived": self.archived,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "properties": self.properties,
        }


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


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


# What json.dumps(value, allow_nan=False) builds on every call, built once: listings encode many values.
_JSON_ENCODER = json.JSONEncoder(allow_nan=False)


def _to_json(value: Any) -> str:
    return _JSON_ENCODER.encode(value)


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


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


def _take_ids(connection: duckdb.DuckDBPyConnection, counter: str, count: int) -> int:
    """Reserve ``count`` consecutive ids of a counter, in the caller's transaction: the first.

    ``counter`` is one of :data:`~mantle_assets.entities.schema.ID_COUNTERS`.

    Two transactions taking ids at once both update the counter's row: a
    shared catalog lets one of them commit and fails the other, which reruns
    (see :meth:`StoreDatabase.run`), so no id is given twice.
    """
    connection.execute("UPDATE id_counters SET value = value + ? WHERE name = ?", [count, counter])
    (last,) = connection.execute("SELECT value FROM id_counters WHERE name = ?", [counter]).fetchone()
    return int(last) - count + 1


def _entity_filter(data_type: str | None, include_archived: bool, entity_ids: list[str] | None = None) -> str:
    """The WHERE clause of a listing of entity_records, its values as literals (see :func:`sql_literal`)."""
    conditions = [] if include_archived else ["NOT archived"]
    if data_type is not None:
        conditions.append(f"data_type = {sql_literal(data_type)}")
    if entity_ids is not None:
        conditions.append(f"list_contains({sql_literal(entity_ids)}, entity_id)")
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


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
        :func:`~mantle_assets.entities.database.is_catalog_uri`); if ``None``,
        ``$MANTLE_ENTITY_STORE`` or else
        :func:`~mantle_assets.entities.database.default_database_path`. A
        file's folder is created on first use, not here.
    lock_timeout : float
        Seconds an operation waits for other processes before raising
        :class:`StoreBusyError`.
    """

    def __init__(self, database: str | os.PathLike | None = None, *, lock_timeout: float = 300.0) -> None:
        self._database = StoreDatabase(database, lock_timeout=lock_timeout)

    @property
    def database(self) -> Path | str:
        """Path or str: the DuckDB file, or the attached catalog."""
        return self._database.location

    def __repr__(self) -> str:
        return f"EntityStore({str(self._database.location)!r})"

    # -- connection handling -------------------------------------------------

    def session(self) -> contextlib.AbstractContextManager[None]:
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
        return self._database.session()

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
        return self._database.snapshot(destination)

    def reader(self) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A read-only connection for SQL over the store that neither waits for pipeline runs nor blocks them.

        A DuckDB file admits no reader beside a writer, so the connection is
        to a :meth:`snapshot` in a temporary folder, removed afterwards. An
        attached catalog admits readers beside writers and is read directly.

        Yields
        ------
        duckdb.DuckDBPyConnection
            With the store's tables and views (``entities``, ``lineage``, ...) in its current schema.
        """
        return self._database.reader()

    def _transaction(self) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        """One transaction, on the session's connection or one of its own (see :meth:`StoreDatabase.transaction`)."""
        return self._database.transaction()

    # -- helpers that run inside a transaction ---------------------------------

    @staticmethod
    def _fetch(connection: duckdb.DuckDBPyConnection, entity_id: str) -> Entity:
        row = connection.execute(
            f"SELECT {_ENTITY_COLUMNS} FROM entity_records WHERE entity_id = {sql_literal(str(entity_id))}"
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
    def _record_changes(
        connection: duckdb.DuckDBPyConnection,
        changes: Sequence[tuple[str, str, Any, Any]],
        changed_at: datetime,
        run_id: str | None,
    ) -> None:
        """Add ``(entity_id, property, old_value, new_value)`` rows to the history, change ids in their order."""
        if not changes:
            return
        first = _take_ids(connection, "property_change", len(changes))
        entity_ids, props, old_values, new_values = (list(column) for column in zip(*changes, strict=True))
        # One statement for all rows: unnested parallel lists.
        connection.execute(
            "INSERT INTO property_history (change_id, entity_id, property, old_value, new_value, changed_at, run_id) "
            "SELECT unnest(CAST(? AS BIGINT[])), unnest(CAST(? AS VARCHAR[])), unnest(CAST(? AS VARCHAR[])), "
            "unnest(CAST(? AS VARCHAR[])), unnest(CAST(? AS VARCHAR[])), ?, ?",
            [list(range(first, first + len(changes))), entity_ids, props,
             [None if value is None else _to_json(value) for value in old_values],
             [None if value is None else _to_json(value) for value in new_values], changed_at, run_id],
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
        entity_id = f"E{_take_ids(connection, 'entity', 1):06d}"
        now = utc_now()
        connection.execute(
            f"INSERT INTO entity_records ({_ENTITY_COLUMNS}) VALUES (?, ?, ?, ?, 1, FALSE, ?, ?)",
            [entity_id, data_type, name, _to_json(properties), now, now],
        )
        self._record_changes(
            connection, [(entity_id, prop, None, value) for prop, value in properties.items()], now, run_id
        )
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
        now = utc_now()
        merged = {prop: value for prop, value in {**entity.properties, **changed}.items() if prop not in removed}
        changed.update(dict.fromkeys(removed))
        connection.execute(
            "UPDATE entity_records SET properties = ?, version = version + 1, updated_at = ? WHERE entity_id = ?",
            [_to_json(merged), now, entity.entity_id],
        )
        self._record_changes(
            connection,
            [(entity.entity_id, prop, entity.properties.get(prop), value) for prop, value in changed.items()],
            now,
            run_id,
        )
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
        return self._database.run(lambda connection: self._insert(connection, data_type, name, validated, run_id))

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
                f"{_entity_filter(data_type, include_archived, wanted)} ORDER BY entity_id"
            ).fetchall()
        return [_entity_from_row(row) for row in rows]

    def list_json(self, data_type: str | None = None, *, include_archived: bool = False) -> list[str]:
        """What :meth:`list` finds, each entity as the text of its :meth:`Entity.to_json`, in one query.

        For printing many entities (``mantle entities --json``): each entity's
        stored property text goes into its object as it is, where parsing it
        into an :class:`Entity` and encoding it again would cost most of a
        large listing. The text is what :func:`json.dumps` gives for
        :meth:`Entity.to_json`.

        Parameters
        ----------
        data_type : str, optional
            Only entities of this data type.
        include_archived : bool
            Whether to include archived entities.

        Returns
        -------
        list[str]
            One JSON object per entity, ordered by id.
        """
        if data_type is not None:
            get_data_type(data_type)
        with self._transaction() as connection:
            rows = connection.execute(
                "SELECT entity_id, data_type, name, version, archived, created_at, updated_at, properties "
                f"FROM entity_records {_entity_filter(data_type, include_archived)} ORDER BY entity_id"
            ).fetchall()
        # Properties are stored as json.dumps wrote them (see _to_json), so they go in unparsed. The
        # times are naive UTC: their isoformat() plus the offset is the aware time's.
        return [
            f'{{"entity_id": {_to_json(entity_id)}, "data_type": {_to_json(kind)}, "name": {_to_json(name)}, '
            f'"version": {int(version)}, "archived": {"true" if archived else "false"}, '
            f'"created_at": "{created_at.isoformat()}+00:00", "updated_at": "{updated_at.isoformat()}+00:00", '
            f'"properties": {properties}}}'
            for entity_id, kind, name, version, archived, created_at, updated_at, properties in rows
        ]

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
                f"SELECT entity_id FROM entity_records {_entity_filter(data_type, include_archived)} ORDER BY entity_id"
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

        def write(connection: duckdb.DuckDBPyConnection) -> list[str]:
            for _, properties in validated:
                self._check_references(connection, data_type, properties)
            first = _take_ids(connection, "entity", len(validated))
            ids = [f"E{number:06d}" for number in range(first, first + len(validated))]
            now = utc_now()
            connection.execute(
                f"INSERT INTO entity_records ({_ENTITY_COLUMNS}) "
                "SELECT unnest(?), ?, unnest(?), unnest(?), 1, FALSE, ?, ?",
                [ids, data_type, [name for name, _ in validated],
                 [_to_json(properties) for _, properties in validated], now, now],
            )
            self._record_changes(
                connection,
                [(entity_id, prop, None, value)
                 for entity_id, (_, properties) in zip(ids, validated, strict=True)
                 for prop, value in properties.items()],
                now,
                run_id,
            )
            return ids

        ids = self._database.run(write)
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
            Parent id to its current output, for the parents that have one, in parent id order
            (so that sensors request runs in the order the plates were registered).
        """
        wanted = None if parents is None else [str(parent) for parent in parents]
        columns = ", ".join(f"e.{column.strip()}" for column in _ENTITY_COLUMNS.split(","))
        with self._transaction() as connection:
            rows = connection.execute(
                f"SELECT l.parent_id, {columns} FROM lineage_edges l JOIN entity_records e ON e.entity_id = l.child_id "
                "WHERE l.pipeline = ? AND e.data_type = ? AND NOT e.archived "
                "AND (CAST(? AS VARCHAR[]) IS NULL OR list_contains(CAST(? AS VARCHAR[]), l.parent_id)) "
                "QUALIFY row_number() OVER ("
                "  PARTITION BY l.parent_id ORDER BY l.created_at DESC, l.child_id DESC, l.run_id DESC) = 1 "
                "ORDER BY l.parent_id",
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
        def write(connection: duckdb.DuckDBPyConnection) -> Entity:
            entity = self._fetch(connection, entity_id)
            validated = get_data_type(entity.data_type).validate(changes, partial=True)
            return self._apply_changes(connection, entity, validated, run_id)

        return self._database.run(write)

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
        def write(connection: duckdb.DuckDBPyConnection) -> Entity:
            entity = self._fetch(connection, entity_id)
            if entity.archived:
                return entity
            now = utc_now()
            connection.execute(
                "UPDATE entity_records SET archived = TRUE, version = version + 1, updated_at = ? "
                "WHERE entity_id = ?",
                [now, entity_id],
            )
            self._record_changes(connection, [(entity_id, _ARCHIVED_PROPERTY, False, True)], now, run_id)
            return self._fetch(connection, entity_id)

        return self._database.run(write)

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
                f"FROM property_history WHERE entity_id = {sql_literal(str(entity_id))} ORDER BY change_id"
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
            :func:`~mantle_assets.entities.measurement_tables.record_readout`).
        before_writing : callable, optional
            Called with no argument inside the transaction, under the store's
            lock, before anything is written; an exception from it ends the
            record with nothing written. For checks that must be as late as
            possible, such as whether the run is still wanted. Called again
            when a shared catalog reruns the transaction after a conflict.

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
                f"parameters of pipeline {pipeline!r} are not JSON-serialisable: {one_line(error)}"
            ) from None

        def write(connection: duckdb.DuckDBPyConnection) -> Entity:
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
                # A write to the child's row, even one changing nothing, makes a concurrent recorder of the same
                # child conflict: without it, on DuckLake (no unique keys) both would add the edge they both lack.
                connection.execute(
                    "UPDATE entity_records SET updated_at = updated_at WHERE entity_id = ?", [child.entity_id]
                )
            now = utc_now()
            for parent_id in unique_parents:
                connection.execute(
                    f"INSERT INTO lineage_edges ({_EDGE_COLUMNS}) "
                    "SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS ("
                    "  SELECT 1 FROM lineage_edges WHERE parent_id = ? AND child_id = ? AND run_id = ?)",
                    [parent_id, child.entity_id, pipeline, run_id, parameters_json, now,
                     parent_id, child.entity_id, run_id],
                )
            if measurements is not None:
                replace_measurements(connection, child.entity_id, measurements)
            if readout is not None:
                record_readout(connection, child.entity_id, run_id, readout)
            return child

        return self._database.run(write)

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
                f"SELECT {_EDGE_COLUMNS} FROM lineage_edges WHERE {column} = {sql_literal(str(entity_id))} "
                f"ORDER BY created_at, {order}, run_id"
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
