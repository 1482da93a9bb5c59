"""What the entity store raises when an entity is missing or the database cannot serve."""

from __future__ import annotations

from typing import Any

__all__ = [
    "EntityNotFoundError",
    "NotAStoreError",
    "SchemaVersionError",
    "StoreBusyError",
    "StoreConflictError",
    "StoreCorruptedError",
    "StoreDiskFullError",
    "StoreUnusableError",
]

WHAT_TO_DO_WITH_A_FOREIGN_FILE = "it was left unchanged: point MANTLE_ENTITY_STORE at another file, or move it away"


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


class StoreConflictError(StoreBusyError):
    """A shared catalog (DuckLake, PostgreSQL) refused the transaction for a concurrent writer's; rerun it."""


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
