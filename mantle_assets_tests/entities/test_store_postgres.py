"""The entity store shared through PostgreSQL: a DuckLake catalog in it, and its own tables, on a real server.

Each test runs on both: ``MANTLE_ENTITY_STORE=ducklake:postgres:<dsn>`` (Parquet files under
``MANTLE_ENTITY_STORE_DATA_PATH``) and ``MANTLE_ENTITY_STORE=postgres:<dsn>``. Writers are separate
processes, as pipeline steps are.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from mantle_assets.entities import EntityStore, StoreUnusableError
from mantle_assets_tests.entities.test_store_measurements import objects, plate_readout_json

WRITERS = 8
OUTPUTS_PER_WRITER = 2
SHARED_RUN = "run-shared"


@pytest.fixture(params=["ducklake", "postgres"])
def shared_store(request, postgres_server, postgres_database, tmp_path, monkeypatch) -> str:
    """The store's URI, also in ``$MANTLE_ENTITY_STORE`` (and the data path), which spawned writers inherit."""
    uri = f"postgres:{postgres_server.dsn(postgres_database)}"
    if request.param == "ducklake":
        uri = f"ducklake:{uri}"
        monkeypatch.setenv("MANTLE_ENTITY_STORE_DATA_PATH", str(tmp_path / "lake") + os.sep)
    monkeypatch.setenv("MANTLE_ENTITY_STORE", uri)
    return uri


def folder(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def rows(store: EntityStore, sql: str) -> list[tuple]:
    with store.reader() as connection:
        return connection.execute(sql).fetchall()


def test_store_operations_round_trip(shared_store, tmp_path):
    store = EntityStore(shared_store)
    plate = store.register("annotated_image_directory", "plate", {"annotated_directory": folder(tmp_path, "plate")})
    assert (plate.entity_id, plate.version) == ("E000001", 1)
    more = store.register_many("annotated_image_directory", [
        ("second", {"annotated_directory": folder(tmp_path, "second")}),
        ("third", {"annotated_directory": folder(tmp_path, "third")}),
    ])
    assert [entity.entity_id for entity in more] == ["E000002", "E000003"]

    measured = store.record_output(
        "annotated_image_directory", "measured", {"annotated_directory": folder(tmp_path, "measured")},
        parents=[plate.entity_id, "E000002"], pipeline="cell-measurements", run_id="run-1",
        parameters={"threshold": 0.5}, measurements=objects(ratio_of_second=3.0),
    )
    again = store.record_output(
        "annotated_image_directory", "measured", {"annotated_directory": folder(tmp_path, "measured 2")},
        parents=[plate.entity_id, "E000002"], pipeline="cell-measurements", run_id="run-2", parameters={},
    )
    assert (again.entity_id, again.version) == (measured.entity_id, 2)  # a new version of the same output
    readout = store.record_output(
        "annotated_image_directory", "read out", {"annotated_directory": folder(tmp_path, "read out")},
        parents=[plate.entity_id], pipeline="assay-readout", run_id="run-3", parameters={},
        readout=plate_readout_json(0.5, (1.0, 4.0)),
    )

    updated = store.update("E000003", {"annotated_directory": folder(tmp_path, "moved")}, run_id="run-4")
    archived = store.archive("E000003")
    assert (updated.version, archived.version, archived.archived) == (2, 3, True)
    assert [(c.property, c.run_id) for c in store.history("E000003")] == [
        ("annotated_directory", None), ("annotated_directory", "run-4"), ("archived", None)]
    assert [e.entity_id for e in store.list()] == ["E000001", "E000002", measured.entity_id, readout.entity_id]
    assert [e.entity_id for e in store.find("annotated_image_directory", "annotated_directory",
                                            [str(tmp_path / "second")])] == ["E000002"]
    assert [(e.parent_id, e.run_id, e.parameters) for e in store.parents(measured.entity_id)] == [
        ("E000001", "run-1", {"threshold": 0.5}), ("E000002", "run-1", {"threshold": 0.5}),
        ("E000001", "run-2", {}), ("E000002", "run-2", {})]
    assert {e.child_id for e in store.descendants("E000001")} == {measured.entity_id, readout.entity_id}
    assert {e.parent_id for e in store.ancestors(measured.entity_id)} == {"E000001", "E000002"}
    assert store.current_outputs("assay-readout", "annotated_image_directory") == {"E000001": readout}
    assert sorted(store.outputs_of_runs(["run-1", "run-3"])) == ["run-1", "run-3"]

    # What a user's SQL sees, through the views PostgreSQL keeps.
    assert rows(store, "SELECT count(*) FROM cell_measurements") == [(3 * 2,)]
    assert rows(store, "SELECT entity_id, z_prime FROM current_assay_readouts") == [(readout.entity_id, 0.5)]
    assert rows(store, "SELECT well FROM current_readout_wells ORDER BY well") == [("A01",), ("A02",)]
    properties = rows(store, f"SELECT properties FROM entities WHERE entity_id = '{measured.entity_id}'")
    assert json.loads(properties[0][0]) == {"annotated_directory": str(tmp_path / "measured 2")}


def test_a_new_ducklake_catalog_without_a_data_path_is_refused_in_one_line(
    postgres_server, postgres_database, monkeypatch
):
    monkeypatch.delenv("MANTLE_ENTITY_STORE_DATA_PATH", raising=False)
    store = EntityStore(f"ducklake:postgres:{postgres_server.dsn(postgres_database)}")
    with pytest.raises(StoreUnusableError, match="new DuckLake catalog: set MANTLE_ENTITY_STORE_DATA_PATH") as raised:
        store.list()
    assert "\n" not in str(raised.value)


def record_on_first_attempt_after(store: EntityStore, other: EntityStore, base: Path) -> list[str]:
    """Record an output whose transaction a concurrent register() overtakes; the names of what ran before writing."""
    attempts = []

    def overtaken() -> None:
        attempts.append("attempt")
        if len(attempts) == 1:
            other.register("annotated_image_directory", "overtaking", {"annotated_directory": folder(base, "o")})

    store.record_output(
        "annotated_image_directory", "overtaken", {"annotated_directory": folder(base, "overtaken")},
        parents=["E000001"], pipeline="cell-measurements", run_id="run-1", parameters={},
        before_writing=overtaken,
    )
    return attempts


def test_a_write_conflict_is_rerun(shared_store, tmp_path):
    store = EntityStore(shared_store)
    store.register("annotated_image_directory", "plate", {"annotated_directory": folder(tmp_path, "plate")})
    # A second store object has its own connection: its register() commits while the first transaction is open.
    attempts = record_on_first_attempt_after(store, EntityStore(shared_store), tmp_path)
    assert len(attempts) == 2  # the first attempt lost to the concurrent writer, the rerun committed
    assert [(e.entity_id, e.name) for e in store.list()] == [
        ("E000001", "plate"), ("E000002", "overtaking"), ("E000003", "overtaken")]
    assert [e.child_id for e in store.children("E000001")] == ["E000003"]


def write_as_a_pipeline_would(writer: int, base: str) -> None:
    """Register a plate, record outputs from it and the shared plate, and all record the same shared output."""
    store = EntityStore()
    own = store.register("annotated_image_directory", f"plate {writer}",
                         {"annotated_directory": folder(Path(base), f"plate {writer}")})
    for output in range(OUTPUTS_PER_WRITER):
        store.record_output(
            "annotated_image_directory", f"output {writer}.{output}",
            {"annotated_directory": folder(Path(base), f"output {writer}.{output}")},
            parents=["E000001", own.entity_id], pipeline=f"pipeline-{output}", run_id=f"run-{writer}-{output}",
            parameters={"writer": writer}, measurements=objects(),
        )
    store.record_output(
        "annotated_image_directory", "shared output", {"annotated_directory": folder(Path(base), "shared output")},
        parents=["E000001"], pipeline="shared", run_id=SHARED_RUN, parameters={},
    )


def count_entities_with_the_cli() -> int:
    completed = subprocess.run(
        [sys.executable, "-m", "mantle_assets.cli", "sql", "SELECT count(*) AS n FROM entities", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)[0]["n"]


@pytest.mark.slow
def test_eight_concurrent_writers_lose_and_duplicate_nothing_while_a_user_reads(shared_store, tmp_path):
    store = EntityStore(shared_store)
    store.register("annotated_image_directory", "shared plate", {"annotated_directory": folder(tmp_path, "shared")})
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=write_as_a_pipeline_would, args=(writer, str(tmp_path)))
               for writer in range(WRITERS)]
    started = time.monotonic()
    for process in writers:
        process.start()
    seen = []
    while any(process.is_alive() for process in writers):
        seen.append(count_entities_with_the_cli())  # a second process's SQL, beside the writers
    for process in writers:
        process.join()
    elapsed = time.monotonic() - started
    assert [process.exitcode for process in writers] == [0] * WRITERS

    expected_entities = {"shared plate", "shared output"} | {f"plate {w}" for w in range(WRITERS)} | {
        f"output {w}.{o}" for w in range(WRITERS) for o in range(OUTPUTS_PER_WRITER)}
    names = [name for (name,) in rows(store, "SELECT name FROM entities")]
    ids = [entity_id for (entity_id,) in rows(store, "SELECT entity_id FROM entity_records")]
    by_name = {entity.name: entity.entity_id for entity in store.list()}
    expected_edges = {("E000001", by_name["shared output"], SHARED_RUN)} | {
        (parent, by_name[f"output {w}.{o}"], f"run-{w}-{o}")
        for w in range(WRITERS) for o in range(OUTPUTS_PER_WRITER) for parent in ("E000001", by_name[f"plate {w}"])}
    edges = rows(store, "SELECT parent_id, child_id, run_id FROM lineage_edges")
    changes = [change for (change,) in rows(store, "SELECT change_id FROM property_history")]
    lost = len(expected_entities - set(names)) + len(expected_edges - set(edges))
    duplicated = (len(names) - len(set(names))) + (len(edges) - len(set(edges))) + (len(ids) - len(set(ids)))
    print(f"\n{WRITERS} writers on {shared_store.split(':')[0]}: {elapsed:.1f} s, {len(names)} entities, "
          f"{len(edges)} edges, lost={lost}, duplicated={duplicated}, {len(seen)} reads by `mantle sql` beside them")
    assert (lost, duplicated) == (0, 0)
    assert set(names) == expected_entities and set(edges) == expected_edges
    assert len(changes) == len(set(changes)) == len(names)  # one property each, each change id once
    assert rows(store, "SELECT count(*) FROM cell_measurements") == [(WRITERS * OUTPUTS_PER_WRITER * 3 * 2,)]
    assert seen and seen == sorted(seen) and seen[-1] <= len(expected_entities)


class _HangsAtTheWells(Mapping):
    """A readout that, read up to its wells, says so in a file and waits to be killed: mid-transaction."""

    def __init__(self, readout: dict, signal_file: str) -> None:
        self._readout, self._signal_file = readout, signal_file

    def __getitem__(self, key):
        if key == "wells":
            Path(self._signal_file).write_text("writing")
            time.sleep(600)
        return self._readout[key]

    def __iter__(self):
        return iter(self._readout)

    def __len__(self) -> int:
        return len(self._readout)


def record_and_hang(base: str, signal_file: str) -> None:
    EntityStore().record_output(
        "annotated_image_directory", "killed", {"annotated_directory": folder(Path(base), "killed")},
        parents=["E000001"], pipeline="assay-readout", run_id="run-killed", parameters={}, measurements=objects(),
        readout=_HangsAtTheWells(plate_readout_json(0.5, (1.0, 4.0)), signal_file),
    )


def test_a_writer_killed_mid_transaction_leaves_no_partial_entity(shared_store, tmp_path):
    store = EntityStore(shared_store)
    store.register("annotated_image_directory", "plate", {"annotated_directory": folder(tmp_path, "plate")})
    signal_file = tmp_path / "writing"
    writer = multiprocessing.get_context("spawn").Process(
        target=record_and_hang, args=(str(tmp_path), str(signal_file)))
    writer.start()
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists() and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert signal_file.exists(), f"the writer never reached the readout's wells (exit code {writer.exitcode})"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
    assert writer.exitcode == -signal.SIGKILL

    # The entity, its history, edge and measurements were written in the killed transaction: none is left.
    assert [e.name for e in store.list()] == ["plate"]
    assert rows(store, "SELECT count(*) FROM property_history") == [(1,)]
    assert rows(store, "SELECT count(*) FROM lineage_edges") == [(0,)]
    assert rows(store, "SELECT count(*) FROM cell_measurements") == [(0,)]
    # And the store takes the next writer, whose id follows the plate's.
    after = store.register("annotated_image_directory", "after", {"annotated_directory": folder(tmp_path, "after")})
    assert after.entity_id == "E000002"
