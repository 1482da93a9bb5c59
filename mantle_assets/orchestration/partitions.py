"""The one partitions definition: one partition per ``image_directory`` entity, keyed by its id and its names.

Dagster's UI finds a partition by typing part of its key into the Partitions tab's filter, and a
scientist knows a plate by its experiment and folder, not by ``E000012``. A key therefore starts with
the entity id, which the assets read back with :func:`entity_id_of`, and goes on with the experiment
and the entity's name: ``E000012 nfkb-dose-response / plate3``. Names of entities never change, so
neither does a key. Keys of deployments from before names were added (the bare id) still work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from dagster import DynamicPartitionsDefinition

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from mantle_assets.entities import Entity

image_directory_partitions = DynamicPartitionsDefinition(name="image_directory")

# Room for the names in the UI's partition list; the id comes first, so a cut never loses it.
MAX_KEY_LENGTH = 100
# Dagster refuses keys with control characters or "..."; whitespace runs would read as one space anyway.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+|\s+|\.{3,}")


def partition_key(entity: Entity) -> str:
    """The partition key of an ``image_directory`` entity: ``<id> <experiment> / <name>``, or ``<id> <name>``.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> partition_key(SimpleNamespace(entity_id="E000012", name="plate3",
    ...                               properties={"experiment_name": "NF-kB dose response"}))
    'E000012 NF-kB dose response / plate3'
    >>> partition_key(SimpleNamespace(entity_id="E000013", name="plate3", properties={}))
    'E000013 plate3'
    """
    names = [entity.properties.get("experiment_name"), entity.name]
    label = " / ".join(_UNSAFE.sub(" ", str(name)).strip() for name in names if name)
    return f"{entity.entity_id} {label}"[:MAX_KEY_LENGTH].rstrip() if label else entity.entity_id


def entity_id_of(key: str) -> str:
    """The entity id a partition key starts with.

    >>> entity_id_of("E000012 NF-kB dose response / plate3"), entity_id_of("E000012")
    ('E000012', 'E000012')
    """
    return key.split(" ", 1)[0]


def keys_by_entity_id(keys: Iterable[str]) -> dict[str, str]:
    """Map entity ids to their partition keys."""
    return {entity_id_of(key): key for key in keys}


def ensure_partition(instance: DagsterInstance, entity: Entity) -> str:
    """The partition key of an ``image_directory`` entity, its partition added if it has none."""
    existing = keys_by_entity_id(instance.get_dynamic_partitions(image_directory_partitions.name))
    if entity.entity_id in existing:
        return existing[entity.entity_id]
    key = partition_key(entity)
    instance.add_dynamic_partitions(image_directory_partitions.name, [key])
    return key
