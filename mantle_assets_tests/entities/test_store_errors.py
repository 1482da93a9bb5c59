"""A store that no retry can mend says what it is, in one line, at once: real files, a real full disk."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from mantle_assets.entities import (
    EntityStore,
    NotAStoreError,
    StoreBusyError,
    StoreCorruptedError,
    StoreDiskFullError,
    StoreUnusableError,
)
from mantle_assets_tests.conftest import fill_disk

# A retried store error would take at least the default lock timeout (300 s) to surface.
AT_ONCE = 10.0
WHAT_TO_DO = "it was left unchanged: point MANTLE_ENTITY_STORE at another file, or move it away"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "mantle.duckdb"
    path.parent.mkdir()
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def mantle_store(path: Path, images: Path, entities: int = 3) -> list[str]:
    store = EntityStore(path)
    return [store.register("image_directory", f"plate {n}", {"image_directory": images}).entity_id
            for n in range(entities)]


def refusal(store: EntityStore, images: Path, error_type: type[StoreUnusableError]) -> str:
    """The message of the error that reading and writing ``store`` both raise, checked to be one line."""
    messages = set()
    for operation in (store.list, lambda: store.register("image_directory", "x", {"image_directory": images})):
        with pytest.raises(error_type) as raised:
            operation()
        messages.add(str(raised.value))
    (message,) = messages
    assert "\n" not in message
    return message


def foreign_tables(path: Path) -> None:
    with duckdb.connect(str(path)) as connection:
        connection.execute("CREATE TABLE entities (id INTEGER, label VARCHAR)")
        connection.execute("INSERT INTO entities VALUES (1, 'theirs')")


def sqlite_file(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE entities (id INTEGER)")
    connection.close()


NOT_DUCKDB = {
    "text": lambda path: path.write_text("plate,well\n1,A01\n"),
    "random bytes": lambda path: path.write_bytes(random.Random(0).randbytes(65536)),
    "SQLite": sqlite_file,
}


# -- not a Mantle store ------------------------------------------------------------


def test_a_duckdb_file_of_other_tables_is_refused_and_left_unchanged(database, images):
    foreign_tables(database)
    before = database.read_bytes()

    message = refusal(EntityStore(database), images, NotAStoreError)

    assert message == (f"{database} is a DuckDB database but not a Mantle entity store (it holds 'entities' and no "
                       f"schema_version table); {WHAT_TO_DO}")
    assert database.read_bytes() == before
    with duckdb.connect(str(database), read_only=True) as connection:
        assert connection.execute("SELECT * FROM entities").fetchall() == [(1, "theirs")]


def test_an_empty_duckdb_database_becomes_a_store(database, images):
    duckdb.connect(str(database)).close()
    assert mantle_store(database, images, entities=1) == ["E000001"]


@pytest.mark.parametrize("make", list(NOT_DUCKDB.values()), ids=list(NOT_DUCKDB))
def test_a_file_that_is_not_duckdb_is_refused_and_left_unchanged(database, images, make):
    make(database)
    before = database.read_bytes()

    message = refusal(EntityStore(database), images, NotAStoreError)

    assert message == f"{database} is not a DuckDB database; {WHAT_TO_DO}"
    assert database.read_bytes() == before


@pytest.mark.parametrize(("make", "kind"), [(Path.touch, "empty"), (Path.mkdir, "a directory")])
def test_an_empty_file_or_a_directory_is_named_as_such(database, images, make, kind):
    make(database)
    assert refusal(EntityStore(database), images, NotAStoreError) == (
        f"{database} is not a DuckDB database (it is {kind}); {WHAT_TO_DO}")


def test_an_attached_catalog_that_is_not_a_store_is_refused_not_retried(database, images):
    text, foreign = database.with_name("text.duckdb"), database.with_name("foreign.duckdb")
    NOT_DUCKDB["text"](text)
    foreign_tables(foreign)
    assert refusal(EntityStore(f"duckdb:{text}"), images, NotAStoreError) == (
        f"duckdb:{text} is not a DuckDB database; {WHAT_TO_DO}")
    assert "is a DuckDB database but not a Mantle entity store" in refusal(
        EntityStore(f"duckdb:{foreign}"), images, NotAStoreError)


# -- corrupted ------------------------------------------------------------------------


def truncate(path: Path) -> None:
    # As a copy cut short: the store's first block starts at 12 KiB and is 256 KiB long.
    path.write_bytes(path.read_bytes()[: 64 * 1024])


def damage_first_block(path: Path) -> None:
    # Past DuckDB's three 4 KiB headers, after the block's own checksum.
    content = bytearray(path.read_bytes())
    content[3 * 4096 + 8 : 4 * 4096] = bytes(4096 - 8)
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(("damage", "duckdb_says"), [
    (truncate, "Could not read enough bytes from file"),
    (damage_first_block, "Corrupt database file: computed checksum"),
])
def test_a_corrupted_store_says_so_in_one_line(database, images, damage, duckdb_says):
    mantle_store(database, images)
    damage(database)
    before = database.read_bytes()

    for target in (str(database), f"duckdb:{database}"):
        message = refusal(EntityStore(target), images, StoreCorruptedError)
        assert message.startswith(f"{target} is corrupted (")
        assert duckdb_says in message
        assert message.endswith("): restore it from a backup, or move it away to start an empty store")
    assert database.read_bytes() == before


# -- a full disk ------------------------------------------------------------------------


def test_a_full_disk_fails_a_write_at_once_and_keeps_the_store(small_disk, images):
    database = small_disk / "mantle.duckdb"
    ids = mantle_store(database, images)
    before = database.read_bytes()
    store = EntityStore(database)  # the default lock timeout: 300 s
    filler = fill_disk(small_disk)

    started = time.monotonic()
    with pytest.raises(StoreDiskFullError) as raised:
        store.register("image_directory", "one more", {"image_directory": images})
    assert time.monotonic() - started < AT_ONCE
    assert str(raised.value) == (f"the disk holding {database} is full (No space left on device); nothing was "
                                 "written: free some space, then run again")
    assert [entity.entity_id for entity in store.list()] == ids  # reading needs no space

    filler.unlink()
    assert database.read_bytes() == before
    assert store.register("image_directory", "one more", {"image_directory": images}).entity_id == "E000004"


def test_a_write_that_fills_the_disk_midway_is_rolled_back(small_disk, images, tmp_path):
    database = small_disk / "mantle.duckdb"
    store = EntityStore(database)
    (source,) = mantle_store(database, images, entities=1)
    masks = tmp_path / "masks"
    masks.mkdir()
    rows = 20_000  # as DuckDB writes them, more than the 200 kB left, less than the disk
    measurements = pd.DataFrame({"field": "f1", "label": np.arange(rows), "well": "A01",
                                 "area": np.random.default_rng(0).random(rows)})
    filler = fill_disk(small_disk, leave=200_000)

    def record():
        return store.record_output(
            "segmentation_mask_directory", "masks",
            {"mask_directory": masks, "source_entity": source, "cellpose_model": "nuclei", "nuclei_channel": 0,
             "cytoplasm_channel": 0, "diameter": "None"},
            parents=[source], pipeline="cellpose-segmentation", run_id="run-1", parameters={},
            measurements=measurements,
        )

    started = time.monotonic()
    with pytest.raises(StoreDiskFullError):
        record()
    assert time.monotonic() - started < AT_ONCE
    filler.unlink()
    assert [entity.entity_id for entity in store.list()] == [source]
    assert record().entity_id == "E000002"


def test_a_new_store_on_a_full_disk_leaves_no_file_behind(small_disk, images):
    database = small_disk / "home" / "mantle.duckdb"
    filler = fill_disk(small_disk)

    with pytest.raises(StoreDiskFullError, match="is full"):
        EntityStore(database).list()
    # An empty file left there would read as "not a DuckDB database" once space is freed.
    assert not database.exists()
    filler.unlink()
    assert mantle_store(database, images, entities=1) == ["E000001"]


# -- through the CLI ----------------------------------------------------------------------


def mantle(*args: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mantle_assets.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "MANTLE_ENTITY_STORE": str(store)}, timeout=120)


def one_error_line(completed: subprocess.CompletedProcess, error: StoreUnusableError) -> None:
    assert completed.returncode == 1
    assert completed.stderr == f"Error: {error}\n"


@pytest.mark.parametrize("make", [foreign_tables, NOT_DUCKDB["text"], truncate],
                         ids=["foreign tables", "text", "truncated store"])
def test_the_cli_reports_an_unusable_store_in_one_line(database, images, make):
    if make is truncate:
        mantle_store(database, images)
    make(database)
    with pytest.raises(StoreUnusableError) as raised:
        EntityStore(database).list()

    one_error_line(mantle("entities", store=database), raised.value)


def test_the_cli_reports_a_full_disk_in_one_line_at_once(small_disk, images):
    database = small_disk / "mantle.duckdb"
    (entity_id,) = mantle_store(database, images, entities=1)
    fill_disk(small_disk)
    with pytest.raises(StoreDiskFullError) as raised:
        EntityStore(database).archive(entity_id)

    started = time.monotonic()
    one_error_line(mantle("archive", entity_id, store=database), raised.value)
    assert time.monotonic() - started < AT_ONCE
    listed = mantle("entities", store=database)
    assert listed.returncode == 0 and listed.stdout.startswith(entity_id)
    with pytest.raises(StoreDiskFullError) as raised:
        EntityStore(small_disk / "new" / "mantle.duckdb").list()
    one_error_line(mantle("entities", store=small_disk / "new" / "mantle.duckdb"), raised.value)


def test_file_names_do_not_count_as_what_duckdb_says(tmp_path):
    # DuckDB's message names the file; a folder called "corrupt" must not make a missing catalog corrupted.
    store = EntityStore(f"duckdb:{tmp_path / 'corrupt' / 'no space left on device' / 'catalog.duckdb'}")
    with pytest.raises(StoreBusyError, match="cannot attach entity store"):
        store.list()
