"""Several segmentation runs at once, in separate processes, all writing one entity store.

The store is a DuckDB file, a DuckLake catalog in PostgreSQL, or PostgreSQL's own tables (a real server).
"""

import os
import subprocess
import sys
import time

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.partitions import partition_key
from mantle_assets_tests.conftest import EIGHT_WELLS, register_crop_per_well

pytestmark = pytest.mark.slow

RUNS = 8


@pytest.fixture(params=["duckdb", "ducklake", "postgres"])
def entity_store(request, tmp_path, mantle_home, monkeypatch) -> str:
    """The kind of store the runs share, set in $MANTLE_ENTITY_STORE for them (a DuckDB file by default)."""
    if request.param != "duckdb":
        server = request.getfixturevalue("postgres_server")
        uri = f"postgres:{server.dsn(server.create_database())}"
        if request.param == "ducklake":
            uri = f"ducklake:{uri}"
            monkeypatch.setenv("MANTLE_ENTITY_STORE_DATA_PATH", str(tmp_path / "lake") + os.sep)
        monkeypatch.setenv("MANTLE_ENTITY_STORE", uri)
    return request.param


def test_concurrent_runs_record_every_entity_and_edge(tmp_path, mantle_home, entity_store, bundled_model_name):
    store = EntityStore()
    sources = register_crop_per_well(tmp_path, store, EIGHT_WELLS[:RUNS], "concurrency")

    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mantle_assets.cli", "segment", entity.entity_id,
             "--cellpose-model", bundled_model_name, "--diameter", "12"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        )
        for entity in sources
    ]
    outcomes = []
    for process in processes:  # communicate() drains the pipes, so a chatty run never blocks on a full one
        _, err = process.communicate(timeout=900)
        outcomes.append((process.returncode, err))
    print(f"\n{RUNS} segmentation runs on {entity_store}: {time.monotonic() - started:.1f} s")
    assert all(code == 0 for code, _ in outcomes), [err for code, err in outcomes if code]
    lock_errors = ("Could not set lock", "database is locked", "StoreBusyError")
    assert not [line for _, err in outcomes for line in err.splitlines() if any(e in line for e in lock_errors)]

    masks = store.list("segmentation_mask_directory")
    assert sorted(m.properties["source_entity"] for m in masks) == [e.entity_id for e in sources]
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        runs = {r.run_id: r for r in instance.get_runs()}
    assert len(runs) == RUNS and all(r.status == DagsterRunStatus.SUCCESS for r in runs.values())
    for entity in sources:
        (edge,) = store.children(entity.entity_id)
        assert edge.run_id in runs
        assert runs[edge.run_id].tags["dagster/partition"] == partition_key(entity)
