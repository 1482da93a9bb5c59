"""The entity store: typed entities, their property history and lineage in DuckDB.

Framework-free; the Dagster layer and the CLI build on it.
"""

from mantle_assets.entities.database import default_database_path
from mantle_assets.entities.errors import (
    EntityNotFoundError,
    NotAStoreError,
    SchemaVersionError,
    StoreBusyError,
    StoreConflictError,
    StoreCorruptedError,
    StoreDiskFullError,
    StoreUnusableError,
)
from mantle_assets.entities.schema import SCHEMA_VERSION
from mantle_assets.entities.store import Entity, EntityStore, LineageEdge, PropertyChange
from mantle_assets.entities.types import (
    DATA_TYPES,
    ENTITY_ID_PATTERN,
    DataType,
    PropertyKind,
    PropertySpec,
    PropertyValidationError,
    UnknownDataTypeError,
    get_data_type,
)

__all__ = [
    "DATA_TYPES",
    "ENTITY_ID_PATTERN",
    "SCHEMA_VERSION",
    "DataType",
    "Entity",
    "EntityNotFoundError",
    "EntityStore",
    "LineageEdge",
    "NotAStoreError",
    "PropertyChange",
    "PropertyKind",
    "PropertySpec",
    "PropertyValidationError",
    "SchemaVersionError",
    "StoreBusyError",
    "StoreConflictError",
    "StoreCorruptedError",
    "StoreDiskFullError",
    "StoreUnusableError",
    "UnknownDataTypeError",
    "default_database_path",
    "get_data_type",
]
