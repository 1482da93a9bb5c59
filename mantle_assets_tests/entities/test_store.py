"""Tests of the entity store against real DuckDB files."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import time
import traceback
from datetime import UTC
from pathlib import Path

import duckdb
import filelock
import pytest

from mantle_assets.entities import (
    SCHEMA_VERSION,
    EntityNotFoundError,
    EntityStore,
    PropertyValidationError,
    SchemaVersionError,
    StoreBusyError,
    UnknownDataTypeError,
    default_database_path,
)

TABLES = ("entity_records", "property_history", "lineage_edges")


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "state" / "mantle.duckdb"


@pytest.fixture
def store(database: Path) -> EntityStore:
    return EntityStore(database, lock_timeout=30)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def _row_counts(database: Path) -> dict[str, int]:
    connection = duckdb.connect(str(database))
    try:
        return {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}
    finally:
        connection.close()


def _mask_properties(folder: Path, source: str, **extra) -> dict:
    folder.mkdir(exist_ok=True)
    return {
        "mask_directory": folder,
        "source_entity": source,
        "cellpose_model": "cyto3",
        "nuclei_channel": 0,
        "cytoplasm_channel": 1,
        "diameter": "30",
        **extra,
    }


# -- schema ---------------------------------------------------------------------


def test_nothing_is_created_before_first_use(database):
    EntityStore(database)
    assert not database.parent.exists()


def test_default_database_path_follows_mantle_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MANTLE_HOME", str(tmp_path / "home"))
    assert default_database_path() == tmp_path / "home" / "mantle.duckdb"
    assert EntityStore().database == tmp_path / "home" / "mantle.duckdb"
    monkeypatch.delenv("MANTLE_HOME")
    assert default_database_path() == Path.cwd() / ".mantle" / "mantle.duckdb"


def test_schema_and_views_are_created_on_first_use(store, database, images):
    assert store.list() == []
    assert database.is_file()
    connection = duckdb.connect(str(database))
    try:
        names = {row[0] for row in connection.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert set(TABLES) | {"schema_version"} <= names
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        views = connection.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        views = {row[0] for row in views}
        assert {"entities", "lineage"} <= views
    finally:
        connection.close()


def test_views_are_browseable_with_plain_duckdb(store, database, images, tmp_path):
    image = store.register("image_directory", "plate 1", {"image_directory": images, "file_count": 3})
    store.record_output(
        "segmentation_mask_directory",
        "plate 1 masks",
        _mask_properties(tmp_path / "masks", image.entity_id),
        parents=[image.entity_id],
        pipeline="segment",
        run_id="run-1",
        parameters={"flow_threshold": 0.4},
    )
    connection = duckdb.connect(str(database))
    try:
        rows = connection.execute(
            "SELECT entity_id, data_type, name, properties->>'$.file_count', version, archived "
            "FROM entities ORDER BY entity_id"
        ).fetchall()
        assert rows[0] == ("E000001", "image_directory", "plate 1", "3", 1, False)
        assert rows[1][:2] == ("E000002", "segmentation_mask_directory")
        lineage = connection.execute(
            "SELECT parent_id, child_id, pipeline, run_id, parameters->>'$.flow_threshold' FROM lineage"
        ).fetchall()
        assert lineage == [("E000001", "E000002", "segment", "run-1", "0.4")]
    finally:
        connection.close()


def test_newer_schema_version_is_refused(store, database, images):
    store.register("image_directory", "plate", {"image_directory": images})
    connection = duckdb.connect(str(database))
    connection.execute("UPDATE schema_version SET version = ?", [SCHEMA_VERSION + 1])
    connection.close()
    with pytest.raises(SchemaVersionError) as error:
        store.get("E000001")
    assert str(database) in str(error.value) and "\n" not in str(error.value)


# -- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_type", "properties", "error_type", "fragment"),
    [
        ("image_directory", {}, PropertyValidationError, "image_directory: property 'image_directory' is required"),
        ("image_directory", {"image_directory": "{images}", "colour": 1}, PropertyValidationError, "'colour'"),
        (
            "image_directory",
            {"image_directory": "{images}", "file_count": "x"},
            PropertyValidationError,
            "image_directory: property 'file_count' must be integer, got str 'x'",
        ),
        ("image_directory", {"image_directory": "{images}/absent"}, PropertyValidationError, "'image_directory'"),
        ("no_such_type", {}, UnknownDataTypeError, "'no_such_type'"),
    ],
)
def test_failed_register_writes_nothing(store, database, images, data_type, properties, error_type, fragment):
    store.list()
    filled = {k: v.format(images=images) if isinstance(v, str) else v for k, v in properties.items()}
    with pytest.raises(error_type) as error:
        store.register(data_type, "bad", filled)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)
    assert _row_counts(database) == {table: 0 for table in TABLES}


def test_register_checks_referenced_entities_exist(store, database, tmp_path):
    store.list()
    with pytest.raises(PropertyValidationError) as error:
        store.register("segmentation_mask_directory", "masks", _mask_properties(tmp_path / "m", "E000099"))
    assert "'source_entity'" in str(error.value) and "E000099" in str(error.value)
    assert _row_counts(database) == {table: 0 for table in TABLES}


def _run_has_ended():
    raise RuntimeError("run run-1 was marked failed")


def test_failed_record_output_writes_nothing(store, database, images, tmp_path):
    image = store.register("image_directory", "plate", {"image_directory": images})
    before = _row_counts(database)
    good = _mask_properties(tmp_path / "masks", image.entity_id)
    attempts = [
        (EntityNotFoundError, dict(properties=good, parents=[image.entity_id, "E000042"])),
        (PropertyValidationError, dict(properties={**good, "total_cells": "many"}, parents=[image.entity_id])),
        (ValueError, dict(properties=good, parents=[])),
        (ValueError, dict(properties=good, parents=[image.entity_id], parameters={"f": object()})),
        (RuntimeError, dict(properties=good, parents=[image.entity_id], before_writing=_run_has_ended)),
    ]
    for error_type, arguments in attempts:
        arguments = {"pipeline": "segment", "run_id": "run-1", "parameters": {}, **arguments}
        with pytest.raises(error_type) as error:
            store.record_output("segmentation_mask_directory", "masks", **arguments)
        assert "\n" not in str(error.value)
    assert _row_counts(database) == before


# -- ids, get, list, update, archive --------------------------------------------


def test_ids_are_sequential_and_readable(store, images):
    ids = [store.register("image_directory", f"p{i}", {"image_directory": images}).entity_id for i in range(3)]
    assert ids == ["E000001", "E000002", "E000003"]
    assert [entity.entity_id for entity in store.list()] == ids
    entity = store.get("E000002")
    assert entity.name == "p1" and entity.version == 1 and not entity.archived
    assert entity.properties == {"image_directory": images.as_posix()}
    assert entity.created_at.tzinfo == UTC and entity.updated_at == entity.created_at


def test_unknown_id_raises_entity_not_found(store):
    with pytest.raises(EntityNotFoundError) as error:
        store.get("E000042")
    assert str(error.value) == "no entity E000042"
    assert isinstance(error.value, KeyError)
    assert str(pickle.loads(pickle.dumps(error.value))) == "no entity E000042"
    for call in (store.update, store.archive, store.history, store.parents, store.children):
        with pytest.raises(EntityNotFoundError):
            call("E000042", *([{}] if call == store.update else []))


def test_history_records_old_and_new_values_and_versions(store, images):
    entity = store.register("image_directory", "plate", {"image_directory": images, "file_count": 1}, run_id="r0")
    first = store.update(entity.entity_id, {"file_count": 2, "experiment_name": "exp"}, run_id="r1")
    second = store.update(entity.entity_id, {"file_count": 3}, run_id="r2")
    assert (entity.version, first.version, second.version) == (1, 2, 3)
    assert second.properties == {"image_directory": images.as_posix(), "file_count": 3, "experiment_name": "exp"}
    assert second.updated_at >= second.created_at
    changes = [(c.property, c.old_value, c.new_value, c.run_id) for c in store.history(entity.entity_id)]
    assert changes == [
        ("image_directory", None, images.as_posix(), "r0"),
        ("file_count", None, 1, "r0"),
        ("file_count", 1, 2, "r1"),
        ("experiment_name", None, "exp", "r1"),
        ("file_count", 2, 3, "r2"),
    ]


def test_update_without_real_change_keeps_version(store, images):
    entity = store.register("image_directory", "plate", {"image_directory": images, "file_count": 1})
    same = store.update(entity.entity_id, {"file_count": 1, "experiment_name": None})
    assert same.version == 1 and len(store.history(entity.entity_id)) == 2


def test_failed_update_writes_nothing(store, database, images):
    entity = store.register("image_directory", "plate", {"image_directory": images})
    before = _row_counts(database)
    with pytest.raises(PropertyValidationError) as error:
        store.update(entity.entity_id, {"file_count": 1, "image_directory": images / "absent"})
    assert "'image_directory'" in str(error.value)
    assert _row_counts(database) == before and store.get(entity.entity_id).version == 1


def test_archive_hides_entity_from_list(store, images):
    kept = store.register("image_directory", "kept", {"image_directory": images})
    gone = store.register("image_directory", "gone", {"image_directory": images})
    archived = store.archive(gone.entity_id, run_id="cleanup")
    assert archived.archived and archived.version == 2
    assert store.archive(gone.entity_id).version == 2
    assert [e.entity_id for e in store.list()] == [kept.entity_id]
    assert [e.entity_id for e in store.list(include_archived=True)] == [kept.entity_id, gone.entity_id]
    assert store.list("cellpose_model") == []
    last = store.history(gone.entity_id)[-1]
    assert (last.property, last.old_value, last.new_value, last.run_id) == ("archived", False, True, "cleanup")


def test_find_returns_unarchived_entities_whose_property_has_one_of_the_values(store, tmp_path):
    folders = {name: tmp_path / name for name in ("a", "b", "c", "it's; DROP TABLE entity_records")}
    for folder in folders.values():
        folder.mkdir()
    ids = {name: store.register("image_directory", name, {"image_directory": folder, "experiment_name": "e"}).entity_id
           for name, folder in folders.items()}
    store.register("segmentation_mask_directory", "masks", _mask_properties(tmp_path / "m", ids["a"]))
    wanted = [folders[name].as_posix() for name in ("c", "a", "it's; DROP TABLE entity_records")]

    found = store.find("image_directory", "image_directory", [*wanted, (tmp_path / "absent").as_posix()])
    assert [e.entity_id for e in found] == [ids["a"], ids["c"], ids["it's; DROP TABLE entity_records"]]
    assert found[0] == store.get(ids["a"])
    store.archive(ids["c"])
    assert [e.name for e in store.find("image_directory", "image_directory", wanted)] == [
        "a", "it's; DROP TABLE entity_records"]
    assert [e.name for e in store.find("image_directory", "image_directory", wanted, include_archived=True)] == [
        "a", "c", "it's; DROP TABLE entity_records"]
    # Only the named property and data type: the masks' source_entity is not an image_directory value.
    assert store.find("image_directory", "experiment_name", [ids["a"]]) == []
    assert [e.name for e in store.find("segmentation_mask_directory", "source_entity", [ids["a"]])] == ["masks"]
    assert store.find("image_directory", "image_directory", []) == []
    assert len(store.list(include_archived=True)) == 5


def test_find_refuses_an_unknown_property_or_data_type(store):
    with pytest.raises(PropertyValidationError, match="image_directory: unknown property 'path'"):
        store.find("image_directory", "path", ["/x"])
    with pytest.raises(UnknownDataTypeError):
        store.find("no_such_type", "image_directory", ["/x"])


# -- lineage --------------------------------------------------------------------


def test_record_output_updates_existing_child_and_adds_edges(store, images, tmp_path):
    image = store.register("image_directory", "plate", {"image_directory": images})
    masks = tmp_path / "masks"

    def record(run_id: str, cells: int):
        return store.record_output(
            "segmentation_mask_directory",
            "plate masks",
            _mask_properties(masks, image.entity_id, total_cells=cells, run_id=run_id),
            parents=[image.entity_id],
            pipeline="segment",
            run_id=run_id,
            parameters={"cells": cells},
        )

    first = record("run-1", 10)
    second = record("run-2", 12)
    assert first.entity_id == second.entity_id
    assert (first.version, second.version) == (1, 2)
    assert [e.entity_id for e in store.list("segmentation_mask_directory")] == [first.entity_id]
    edges = store.children(image.entity_id)
    assert [(e.child_id, e.run_id, e.parameters) for e in edges] == [
        (first.entity_id, "run-1", {"cells": 10}),
        (first.entity_id, "run-2", {"cells": 12}),
    ]
    assert [(e.parent_id, e.pipeline) for e in store.parents(first.entity_id)] == [(image.entity_id, "segment")] * 2
    history = store.history(first.entity_id)
    cells = [(c.old_value, c.new_value, c.run_id) for c in history if c.property == "total_cells"]
    assert cells == [(None, 10, "run-1"), (10, 12, "run-2")]

    retried = record("run-2", 12)
    assert retried.version == 2
    assert len(store.children(image.entity_id)) == 2
    assert store.list("segmentation_mask_directory") == [retried]


def test_a_new_output_version_drops_properties_the_run_did_not_set(store, images, tmp_path):
    image = store.register("image_directory", "plate", {"image_directory": images})
    arguments = dict(parents=[image.entity_id], pipeline="segment", parameters={})
    properties = _mask_properties(tmp_path / "masks", image.entity_id)
    first = store.record_output(
        "segmentation_mask_directory", "m", {**properties, "estimated_diameter": 12.5}, run_id="r1", **arguments
    )
    second = store.record_output("segmentation_mask_directory", "m", properties, run_id="r2", **arguments)
    assert second.entity_id == first.entity_id and second.version == 2
    assert "estimated_diameter" not in second.properties
    removal = [(c.old_value, c.new_value) for c in store.history(second.entity_id)
               if c.property == "estimated_diameter" and c.run_id == "r2"]
    assert removal == [(12.5, None)]


def test_outputs_with_different_names_are_different_entities(store, images, tmp_path):
    image = store.register("image_directory", "plate", {"image_directory": images})
    arguments = dict(parents=[image.entity_id], pipeline="segment", parameters={})
    properties = _mask_properties(tmp_path / "masks", image.entity_id)
    one = store.record_output("segmentation_mask_directory", "one", properties, run_id="r1", **arguments)
    two = store.record_output("segmentation_mask_directory", "two", properties, run_id="r2", **arguments)
    assert one.entity_id != two.entity_id


def test_record_output_matches_the_exact_parent_set(store, images, tmp_path):
    a = store.register("image_directory", "a", {"image_directory": images})
    b = store.register("image_directory", "b", {"image_directory": images})
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"w")

    def train(parents, run_id):
        return store.record_output(
            "cellpose_model",
            "model",
            {"model_file": weights, "training_entities": parents},
            parents=parents,
            pipeline="train",
            run_id=run_id,
            parameters={},
        )

    both = train([a.entity_id, b.entity_id], "t1")
    only_a = train([a.entity_id], "t2")
    again = train([a.entity_id, b.entity_id], "t3")
    assert only_a.entity_id != both.entity_id
    assert again.entity_id == both.entity_id and again.version == 1
    assert {e.parent_id for e in store.parents(both.entity_id)} == {a.entity_id, b.entity_id}


def test_archived_output_is_not_reused(store, images, tmp_path):
    image = store.register("image_directory", "plate", {"image_directory": images})
    arguments = dict(parents=[image.entity_id], pipeline="segment", parameters={})
    properties = _mask_properties(tmp_path / "masks", image.entity_id)
    old = store.record_output("segmentation_mask_directory", "m", properties, run_id="r1", **arguments)
    store.archive(old.entity_id)
    new = store.record_output("segmentation_mask_directory", "m", properties, run_id="r2", **arguments)
    assert new.entity_id != old.entity_id


# -- concurrency ----------------------------------------------------------------


def _writer(database: str, root: str, worker: int, count: int, barrier, results) -> None:
    try:
        store = EntityStore(database, lock_timeout=120)
        barrier.wait(timeout=60)
        pairs = []
        for i in range(count):
            folder = Path(root) / f"w{worker}-{i}"
            image = store.register("image_directory", folder.name, {"image_directory": folder / "images"})
            mask = store.record_output(
                "segmentation_mask_directory",
                f"{folder.name} masks",
                _mask_properties(folder / "masks", image.entity_id, total_cells=i),
                parents=[image.entity_id],
                pipeline="segment",
                run_id=f"run-{worker}-{i}",
                parameters={"worker": worker},
            )
            pairs.append((image.entity_id, mask.entity_id))
        results.put((worker, "ok", pairs))
    except BaseException:
        results.put((worker, "error", traceback.format_exc()))


def _hold_raw_connection(database: str, seconds: float, ready, release) -> None:
    connection = duckdb.connect(database)
    ready.set()
    if release is None:
        time.sleep(seconds)
    else:
        release.wait(seconds)
    connection.close()


def test_concurrent_writer_processes_lose_nothing(store, database, tmp_path):
    workers, count = 4, 15
    for worker in range(workers):
        for i in range(count):
            (tmp_path / f"w{worker}-{i}" / "images").mkdir(parents=True)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    results = context.Queue()
    processes = [
        context.Process(target=_writer, args=(str(database), str(tmp_path), worker, count, barrier, results))
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=240) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
    errors = [detail for _, status, detail in outcomes if status != "ok"]
    assert not errors, "\n".join(errors)
    assert all(process.exitcode == 0 for process in processes)

    pairs = [pair for _, _, worker_pairs in outcomes for pair in worker_pairs]
    images = store.list("image_directory")
    masks = store.list("segmentation_mask_directory")
    assert len(images) == len(masks) == workers * count
    all_ids = [e.entity_id for e in images + masks]
    assert len(set(all_ids)) == 2 * workers * count
    assert sorted(all_ids) == [f"E{n:06d}" for n in range(1, 2 * workers * count + 1)]
    for image_id, mask_id in pairs:
        assert [e.parent_id for e in store.parents(mask_id)] == [image_id]
        assert store.get(mask_id).properties["source_entity"] == image_id


def test_store_waits_for_a_foreign_connection(store, database, images):
    store.register("image_directory", "before", {"image_directory": images})
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_raw_connection, args=(str(database), 1.0, ready, None))
    holder.start()
    try:
        assert ready.wait(60)
        started = time.monotonic()
        entity = store.register("image_directory", "after", {"image_directory": images})
        waited = time.monotonic() - started
    finally:
        holder.join(timeout=60)
    assert holder.exitcode == 0
    assert entity.entity_id == "E000002"
    assert waited >= 0.5
    assert [e.name for e in store.list()] == ["before", "after"]


def test_store_busy_error_after_lock_timeout(database, images):
    EntityStore(database).list()
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_raw_connection, args=(str(database), 60.0, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(StoreBusyError) as error:
            EntityStore(database, lock_timeout=0.3).register("image_directory", "x", {"image_directory": images})
    finally:
        release.set()
        holder.join(timeout=60)
    assert str(database) in str(error.value) and "\n" not in str(error.value)
    assert EntityStore(database).list() == []


def test_store_busy_error_when_our_lock_is_held(database, images):
    database.parent.mkdir(parents=True)
    with filelock.FileLock(str(database) + ".lock"):
        with pytest.raises(StoreBusyError) as error:
            EntityStore(database, lock_timeout=0.2).list()
    assert str(database) in str(error.value) and "\n" not in str(error.value)


# -- set-based queries and sessions ------------------------------------------------


def _record(store: EntityStore, parents: list[str], pipeline: str, run_id: str, folder: Path, name: str = "masks"):
    return store.record_output(
        "segmentation_mask_directory",
        name,
        _mask_properties(folder, parents[0], run_id=run_id),
        parents=parents,
        pipeline=pipeline,
        run_id=run_id,
        parameters={},
    )


def test_register_many_registers_what_register_would(store, images):
    made = store.register_many("image_directory", [(f"plate {i}", {"image_directory": images}) for i in range(3)])
    assert [e.entity_id for e in made] == ["E000001", "E000002", "E000003"]
    assert [e.name for e in made] == ["plate 0", "plate 1", "plate 2"]
    assert made == store.list("image_directory")
    one = store.register("image_directory", "plate 3", {"image_directory": images})
    assert one.entity_id == "E000004"
    assert [(c.property, c.old_value) for c in store.history(made[1].entity_id)] == [("image_directory", None)]
    assert [(c.property, c.new_value) for c in store.history(made[1].entity_id)] == [
        (c.property, c.new_value) for c in store.history(one.entity_id)]


def test_register_many_writes_nothing_when_one_is_invalid(store, database, images):
    store.register("image_directory", "first", {"image_directory": images})
    with pytest.raises(PropertyValidationError):
        store.register_many("image_directory", [("good", {"image_directory": images}), ("bad", {"nonsense": 1})])
    assert _row_counts(database) == {"entity_records": 1, "property_history": 1, "lineage_edges": 0}


def test_list_and_entity_ids_select_some_entities(store, images):
    a, b, c = store.register_many("image_directory", [(name, {"image_directory": images}) for name in "abc"])
    store.archive(b.entity_id)
    assert store.entity_ids("image_directory") == [a.entity_id, c.entity_id]
    assert store.entity_ids(include_archived=True) == [a.entity_id, b.entity_id, c.entity_id]
    assert [e.entity_id for e in store.list(entity_ids=[c.entity_id, "E999999", a.entity_id])] == [
        a.entity_id, c.entity_id]
    assert store.list(entity_ids=[]) == []


def test_list_json_is_each_listed_entity_as_json(store, images, tmp_path):
    plate = store.register("image_directory", 'plate "1" – é', {"image_directory": images, "file_count": 3,
                                                              "experiment_name": "dose\n½"})
    other = store.register("image_directory", "other", {"image_directory": images})
    store.archive(other.entity_id)
    store.record_output("segmentation_mask_directory", "masks", _mask_properties(tmp_path / "masks", plate.entity_id,
                                                                                 extra_parameters={"flow": 0.1 + 0.2}),
                        parents=[plate.entity_id], pipeline="segment", run_id="run-1", parameters={})
    for data_type, archived in ((None, False), (None, True), ("image_directory", True), ("image_directory", False)):
        texts = store.list_json(data_type, include_archived=archived)
        entities = store.list(data_type, include_archived=archived)
        assert [json.loads(text) for text in texts] == [entity.to_json() for entity in entities]
        assert texts == [json.dumps(entity.to_json()) for entity in entities]
    assert len(store.list_json(include_archived=True)) == 3 and store.list_json("cellpose_model") == []


def test_children_of_many_entities_matches_children_of_each(store, images, tmp_path):
    a, b, c = store.register_many("image_directory", [(name, {"image_directory": images}) for name in "abc"])
    _record(store, [a.entity_id], "segment", "run-1", tmp_path / "m1")
    _record(store, [a.entity_id, b.entity_id], "segment", "run-2", tmp_path / "m2")
    children = store.children_of([a.entity_id, b.entity_id, c.entity_id])
    assert children == {a.entity_id: store.children(a.entity_id), b.entity_id: store.children(b.entity_id)}
    assert [e.run_id for e in children[a.entity_id]] == ["run-1", "run-2"]


def test_current_outputs_are_the_newest_unarchived_output_of_each_parent(store, images, tmp_path):
    a, b, c = store.register_many("image_directory", [(name, {"image_directory": images}) for name in "abc"])
    _record(store, [a.entity_id], "segment", "run-1", tmp_path / "a1", "a masks")
    newer_a = _record(store, [a.entity_id], "segment", "run-2", tmp_path / "a2", "a masks again")
    old_b = _record(store, [b.entity_id], "segment", "run-3", tmp_path / "b1", "b masks")
    archived_b = _record(store, [b.entity_id], "segment", "run-4", tmp_path / "b2", "b masks again")
    store.archive(archived_b.entity_id)
    _record(store, [c.entity_id], "another pipeline", "run-5", tmp_path / "c1")
    current = store.current_outputs("segment", "segmentation_mask_directory")
    assert current == {a.entity_id: newer_a, b.entity_id: old_b}
    assert store.current_outputs("segment", "segmentation_mask_directory", [b.entity_id, c.entity_id]) == {
        b.entity_id: old_b}
    assert store.current_outputs("segment", "image_directory") == {}


def test_ancestors_and_descendants_follow_lineage_transitively(store, images, tmp_path):
    a, b = store.register_many("image_directory", [(name, {"image_directory": images}) for name in "ab"])
    m = _record(store, [a.entity_id], "segment", "run-1", tmp_path / "m", "m")
    n = _record(store, [m.entity_id, b.entity_id], "refine", "run-2", tmp_path / "n", "n")
    edges = lambda found: sorted((e.parent_id, e.child_id, e.pipeline) for e in found)  # noqa: E731
    assert edges(store.ancestors(n.entity_id)) == sorted(
        [(a.entity_id, m.entity_id, "segment"), (m.entity_id, n.entity_id, "refine"),
         (b.entity_id, n.entity_id, "refine")])
    assert edges(store.descendants(a.entity_id)) == [
        (a.entity_id, m.entity_id, "segment"), (m.entity_id, n.entity_id, "refine")]
    assert edges(store.descendants(b.entity_id)) == [(b.entity_id, n.entity_id, "refine")]
    assert store.ancestors(a.entity_id) == [] and store.descendants(n.entity_id) == []
    with pytest.raises(EntityNotFoundError):
        store.ancestors("E999999")


def test_a_session_opens_the_file_once_and_survives_a_failed_operation(store, images, monkeypatch):
    opened = []
    real_connect = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda *args, **kwargs: opened.append(args) or real_connect(*args, **kwargs))
    plate = store.register("image_directory", "plate", {"image_directory": images})
    assert len(opened) == 1
    with store.session():
        with pytest.raises(EntityNotFoundError):
            store.update("E999999", {"experiment_name": "x"})
        store.update(plate.entity_id, {"experiment_name": "x"})
        with store.session():
            assert store.get(plate.entity_id).version == 2
        assert store.history(plate.entity_id)[-1].new_value == "x"
    assert len(opened) == 2
    # The lock is released with the session: another store of the same file goes on at once.
    assert EntityStore(store.database, lock_timeout=0.1).get(plate.entity_id).version == 2
