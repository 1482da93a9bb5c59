"""The new-image-directory sensor on a real instance, for each cursor state."""

import duckdb
import numpy as np
import pytest
import tifffile
from dagster import AddDynamicPartitionsRequest, build_sensor_context

from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.partitions import image_directory_partitions, partition_key
from mantle_assets.orchestration.sensors import new_image_directory_sensor
from mantle_assets.registration import register_image_directory


@pytest.fixture
def register(tmp_path):
    store = EntityStore()

    def register_plate(name, defaults=None):
        directory = tmp_path / name
        directory.mkdir()
        tifffile.imwrite(directory / "field.tif", np.zeros((8, 8), np.uint8))
        entity = register_image_directory(store, directory, "exp")
        if defaults:
            entity = store.update(entity.entity_id, {"segmentation_defaults": defaults})
        return entity

    return register_plate


def tick(instance, cursor=None):
    with build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as context:
        result = new_image_directory_sensor(context)
    for request in result.dynamic_partitions_requests or []:
        # Apply what the daemon would apply, so the next tick sees it.
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def test_first_tick_adds_partitions_and_requests_runs_with_defaults(instance, register):
    plain = register("plate-a")
    tuned = register("plate-b", {"nuclei_channel": 2, "cytoplasm_channel": 2, "diameter": "12"})
    result = tick(instance)
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == image_directory_partitions.name
    # Keys carry the experiment and folder, so the UI's partition filter finds a plate by name.
    assert add.partition_keys == [f"{plain.entity_id} exp / plate-a", f"{tuned.entity_id} exp / plate-b"]
    by_key = {r.partition_key: r for r in result.run_requests}
    assert set(by_key) == set(add.partition_keys)
    tuned_config = by_key[partition_key(tuned)].run_config["ops"]["segmentation_masks"]["config"]
    assert (tuned_config["nuclei_channel"], tuned_config["diameter"]) == (2, "12")
    plain_config = by_key[partition_key(plain)].run_config["ops"]["segmentation_masks"]["config"]
    assert (plain_config["nuclei_channel"], plain_config["diameter"]) == (0, "None")
    assert by_key[partition_key(plain)].run_key == f"new-image-directory-{plain.entity_id}"
    assert result.cursor == tuned.entity_id


def test_nothing_new_skips(instance, register):
    register("plate-a")
    first = tick(instance)
    second = tick(instance, first.cursor)
    assert not second.run_requests and not second.dynamic_partitions_requests
    assert "no new" in second.skip_reason.skip_message


def test_only_entities_after_the_cursor_are_requested(instance, register):
    register("plate-a")
    first = tick(instance)
    newer = register("plate-b")
    # Registered through the CLI, its partition may already exist: still one run for it.
    instance.add_dynamic_partitions(image_directory_partitions.name, [partition_key(newer)])
    result = tick(instance, first.cursor)
    assert [r.partition_key for r in result.run_requests] == [partition_key(newer)]
    assert not result.dynamic_partitions_requests
    assert result.cursor == newer.entity_id


def test_a_partition_keyed_by_the_bare_entity_id_is_kept(instance, register):
    """Deployments from before keys carried names have partitions named by the id alone: they stay, not doubled."""
    old = register("plate-a")
    instance.add_dynamic_partitions(image_directory_partitions.name, [old.entity_id])
    result = tick(instance)
    assert not result.dynamic_partitions_requests
    assert [r.partition_key for r in result.run_requests] == [old.entity_id]
    assert instance.get_dynamic_partitions(image_directory_partitions.name) == [old.entity_id]


def test_archived_entity_loses_its_partition(instance, register):
    kept, retired = register("plate-a"), register("plate-b")
    first = tick(instance)
    EntityStore().archive(retired.entity_id)
    result = tick(instance, first.cursor)
    (delete,) = result.dynamic_partitions_requests
    assert delete.partition_keys == [partition_key(retired)]
    assert not result.run_requests
    assert instance.get_dynamic_partitions(image_directory_partitions.name) == [partition_key(kept)]


def test_an_entity_segmented_by_hand_gets_its_partition_but_no_second_run(instance, register, tmp_path):
    entity = register("plate-a")
    masks = tmp_path / "masks"
    masks.mkdir()
    EntityStore().record_output(
        "segmentation_mask_directory", "plate-a masks",
        {"mask_directory": str(masks), "source_entity": entity.entity_id, "cellpose_model": "m",
         "nuclei_channel": 0, "cytoplasm_channel": 0, "diameter": "None"},
        parents=[entity.entity_id], pipeline="cellpose-segmentation", run_id="by-hand", parameters={},
    )
    result = tick(instance)
    assert result.dynamic_partitions_requests[0].partition_keys == [partition_key(entity)]
    assert not result.run_requests


class CountingConnection:
    """A real DuckDB connection that notes each statement it is given."""

    def __init__(self, connection, statements: list):
        self._connection, self._statements = connection, statements

    def execute(self, query, *args, **kwargs):
        self._statements.append(query)
        return self._connection.execute(query, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._connection, name)


@pytest.fixture
def store_statements(monkeypatch) -> list:
    """Every statement the entity store sends to DuckDB while the test runs."""
    statements: list = []
    real_connect = duckdb.connect
    monkeypatch.setattr(
        duckdb, "connect", lambda *args, **kwargs: CountingConnection(real_connect(*args, **kwargs), statements)
    )
    return statements


def add_plates(model, count: int) -> list:
    """``count`` more image directories like ``model``, registered in bulk."""
    return EntityStore().register_many(
        "image_directory", [(f"{model.name} copy", model.properties) for _ in range(count)]
    )


def statements_of(statements: list, evaluate) -> tuple:
    """What ``evaluate()`` returns and how many store statements it sent."""
    before = len(statements)
    result = evaluate()
    return result, len(statements) - before


def test_a_ticks_store_statements_do_not_grow_with_the_plates_already_handled(instance, register, store_statements):
    model = register("plate-a")
    sent = {}
    cursor = None
    for old in (10, 200):
        add_plates(model, old - len(EntityStore().entity_ids()))
        cursor = tick(instance, cursor).cursor  # the old plates are handled
        idle, sent[old, "idle"] = statements_of(store_statements, lambda: tick(instance, cursor))  # noqa: B023
        assert not idle.run_requests
        (new,) = add_plates(model, 1)
        result, sent[old, "new"] = statements_of(store_statements, lambda: tick(instance, cursor))  # noqa: B023
        assert [r.partition_key for r in result.run_requests] == [partition_key(new)]
        cursor = result.cursor
    assert sent[10, "idle"] == sent[200, "idle"] and sent[10, "new"] == sent[200, "new"]
