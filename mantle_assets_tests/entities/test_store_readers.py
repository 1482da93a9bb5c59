"""SQL over the entity store beside running pipelines: readers and writers in separate, real processes."""

import json
import os
import subprocess
import sys
import time

import duckdb
import pytest

from mantle_assets.entities import EntityStore

# Holds a reader open until told to go on, then counts what it sees.
READER = """
import sys
from mantle_assets.entities import EntityStore
with EntityStore(sys.argv[1]).reader() as connection:
    print("open", flush=True)
    sys.stdin.readline()
    print(connection.execute("SELECT count(*) FROM entities").fetchall()[0][0], flush=True)
"""

# Records N outputs of one image directory with a short lock timeout: a reader blocking it fails it.
WRITER = """
import sys
from mantle_assets.entities import EntityStore
store = EntityStore(sys.argv[1], lock_timeout=3)
source = store.register("image_directory", "plate", {"image_directory": sys.argv[2]})
for index in range(int(sys.argv[3])):
    store.record_output(
        "segmentation_mask_directory", f"masks {index}",
        {"mask_directory": sys.argv[2], "source_entity": source.entity_id, "cellpose_model": "nuclei",
         "nuclei_channel": 0, "cytoplasm_channel": 0, "diameter": "None"},
        parents=[source.entity_id], pipeline="cellpose-segmentation", run_id=f"run-{index}", parameters={},
    )
"""


def python(script: str, *args: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], text=True, env=os.environ.copy(), **options)


def mantle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mantle_assets.cli", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "plate"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"")
    return folder


def test_a_reader_held_open_does_not_block_a_writer_process_and_sees_the_store_as_it_opened(image_folder,
                                                                                            mantle_home):
    database = mantle_home / "mantle.duckdb"
    EntityStore(database).register("image_directory", "earlier plate", {"image_directory": str(image_folder)})
    reader = python(READER, str(database), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert reader.stdout.readline() == "open\n"
        writer = python(WRITER, str(database), str(image_folder), "10", stderr=subprocess.PIPE)
        _, errors = writer.communicate(timeout=120)
        assert writer.returncode == 0, errors
        # The reader's view is the store when it opened, not the writes that went on meanwhile.
        seen, _ = reader.communicate("go on\n", timeout=60)
        assert seen == "1\n"
    finally:
        reader.kill()
    assert reader.returncode == 0
    assert mantle("sql", "SELECT count(*) AS n FROM entities").stdout.split() == ["n", "12"]


def test_a_direct_connection_to_the_file_is_what_blocks_writers(tmp_path, image_folder):
    """Why readers get a copy: the same writer fails while a DuckDB connection holds the store's file."""
    database = tmp_path / "mantle.duckdb"
    EntityStore(database).register("image_directory", "earlier plate", {"image_directory": str(image_folder)})
    with duckdb.connect(str(database), read_only=True):
        writer = python(WRITER, str(database), str(image_folder), "1", stderr=subprocess.PIPE)
        _, errors = writer.communicate(timeout=120)
    assert writer.returncode == 1
    assert "StoreBusyError" in errors and "stayed locked by another process for 3s" in errors


def test_mantle_sql_answers_while_another_process_writes(tmp_path, image_folder, mantle_home):
    writer = python(WRITER, str(mantle_home / "mantle.duckdb"), str(image_folder), "40", stderr=subprocess.PIPE)
    counts = []
    try:
        while writer.poll() is None:
            answered = mantle("sql", "--json", "SELECT count(*) AS n, count(DISTINCT entity_id) AS ids FROM entities")
            assert answered.returncode == 0, answered.stderr
            (row,) = json.loads(answered.stdout)
            assert row["n"] == row["ids"]
            counts.append(row["n"])
    finally:
        _, errors = writer.communicate(timeout=120)
    assert writer.returncode == 0, errors
    assert counts == sorted(counts)
    assert json.loads(mantle("sql", "--json", "SELECT count(*) AS n FROM lineage").stdout) == [{"n": 40}]


def test_snapshot_is_a_file_any_duckdb_client_opens_while_runs_write(tmp_path, image_folder, mantle_home):
    store = EntityStore()
    source = store.register("image_directory", "plate", {"image_directory": str(image_folder)})
    snapshot = tmp_path / "browse.duckdb"
    assert mantle("sql", "--snapshot", str(snapshot)).stdout == f"{snapshot}\n"
    with duckdb.connect(str(snapshot), read_only=True) as browsing:
        # A write in this process while the user's connection stays open; then a fresher snapshot over it.
        store.update(source.entity_id, {"experiment_name": "renamed"})
        assert mantle("sql", "--snapshot", str(snapshot)).returncode == 0
        assert browsing.execute("SELECT version FROM entities").fetchall() == [(1,)]
    with duckdb.connect(str(snapshot), read_only=True) as fresh:
        assert fresh.execute("SELECT version, properties->>'experiment_name' FROM entities").fetchall() == [
            (2, "renamed")
        ]
    assert [path.name for path in tmp_path.iterdir() if "partial" in path.name] == []


def test_mantle_sql_refuses_writes_and_bad_sql_in_one_line(mantle_home):
    refused = mantle("sql", "DELETE FROM entity_records")
    assert refused.returncode == 1
    assert refused.stderr.startswith("Error: Invalid Input Error: Cannot execute statement of type \"DELETE\"")
    assert refused.stderr.count("\n") == 1
    bad = mantle("sql", "SELEC 1")
    assert (bad.returncode, bad.stderr.count("\n")) == (1, 1) and "syntax error" in bad.stderr
    neither = mantle("sql")
    assert neither.stderr == "Error: give a QUERY or --snapshot FILE (one of them)\n"


def test_reading_a_catalog_store_goes_to_the_catalog_read_only(tmp_path, image_folder):
    catalog = f"duckdb:{tmp_path / 'catalog.duckdb'}"
    store = EntityStore(catalog)
    store.register("image_directory", "plate", {"image_directory": str(image_folder)})
    with store.reader() as connection:
        assert connection.execute("SELECT name FROM entities").fetchall() == [("plate",)]
        with pytest.raises(duckdb.Error, match="read-only"):
            connection.execute("DELETE FROM entity_records")
    with pytest.raises(ValueError, match="is a catalog: read it directly"):
        store.snapshot(tmp_path / "copy.duckdb")


def test_snapshot_refuses_to_run_inside_a_session(tmp_path):
    store = EntityStore(tmp_path / "mantle.duckdb")
    with store.session(), pytest.raises(RuntimeError, match=r"snapshot\(\) cannot run inside session"):
        store.snapshot(tmp_path / "copy.duckdb")
    assert not (tmp_path / "copy.duckdb").exists()


@pytest.mark.slow
def test_a_real_segment_run_beside_a_browsing_session(bbbc014_crops, bundled_model_name, mantle_home, tmp_path):
    from mantle_assets_tests.test_cli import register

    entity_id = register(str(bbbc014_crops), "--experiment", "browse")
    database = str(mantle_home / "mantle.duckdb")
    reader = python(READER, database, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert reader.stdout.readline() == "open\n"
        segment = subprocess.Popen(
            [sys.executable, "-m", "mantle_assets.cli", "segment", entity_id, "--cellpose-model", bundled_model_name,
             "--nuclei-channel", "2", "--cytoplasm-channel", "2", "--diameter", "None"],
            text=True, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        answers = 0
        while segment.poll() is None:
            answered = mantle("sql", "SELECT entity_id FROM entities")
            assert answered.returncode == 0, answered.stderr
            answers += 1
            time.sleep(0.5)
        _, errors = segment.communicate(timeout=900)
        assert segment.returncode == 0, errors
        assert answers > 0
        seen, _ = reader.communicate("go on\n", timeout=60)
        assert seen == "1\n"
    finally:
        reader.kill()
    lineage = mantle("sql", "--json", "SELECT l.parent_id, e.data_type FROM lineage l "
                                      "JOIN entities e ON e.entity_id = l.child_id").stdout
    assert json.loads(lineage) == [{"parent_id": entity_id, "data_type": "segmentation_mask_directory"}]
