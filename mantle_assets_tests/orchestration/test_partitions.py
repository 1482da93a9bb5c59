"""Partition keys carry the plate's names, stay valid Dagster keys whatever the names, and lead back to the entity."""

import numpy as np
import tifffile

from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.partitions import (
    MAX_KEY_LENGTH,
    ensure_partition,
    entity_id_of,
    image_directory_partitions,
    partition_key,
)
from mantle_assets.registration import register_image_directory


def plate(tmp_path, name):
    directory = tmp_path / name
    directory.mkdir()
    tifffile.imwrite(directory / "field.tif", np.zeros((8, 8), np.uint8))
    return directory


def test_keys_hold_names_dagster_accepts_and_start_with_the_entity_id(instance, tmp_path):
    store = EntityStore()
    awkward = register_image_directory(store, plate(tmp_path, "p"), "dose...response\tday 2", name="plate\n3")
    long = register_image_directory(store, plate(tmp_path, "q"), "x" * 300)
    keys = [ensure_partition(instance, entity) for entity in (awkward, long)]
    # Dagster refuses "..." and control characters in keys; these were added, so it took them.
    assert keys[0] == f"{awkward.entity_id} dose response day 2 / plate 3"
    assert len(keys[1]) == MAX_KEY_LENGTH and keys[1].startswith(f"{long.entity_id} xxx")
    assert [entity_id_of(key) for key in keys] == [awkward.entity_id, long.entity_id]
    assert instance.get_dynamic_partitions(image_directory_partitions.name) == keys


def test_an_existing_partition_is_found_not_added_again(instance, tmp_path):
    entity = register_image_directory(EntityStore(), plate(tmp_path, "p"), "exp")
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])  # a bare-id key of old
    assert ensure_partition(instance, entity) == entity.entity_id
    assert ensure_partition(instance, EntityStore().get(entity.entity_id)) == entity.entity_id
    assert instance.get_dynamic_partitions(image_directory_partitions.name) == [entity.entity_id]
    assert partition_key(entity) == f"{entity.entity_id} exp / p"
