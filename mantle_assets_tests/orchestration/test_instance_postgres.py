"""Dagster's instance (runs, event log, schedules, pools) on PostgreSQL, as the Helm values deploy it."""

import json
import subprocess
import sys

import pytest

from mantle_assets.orchestration.instance import instance_settings

pytestmark = pytest.mark.slow


def mantle(*args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "mantle_assets.cli", *args], capture_output=True, text=True,
                               timeout=900)
    assert completed.returncode == 0, f"mantle {' '.join(args)} failed:\n{completed.stderr}"
    return completed


def test_a_cli_run_is_recorded_in_postgres(bbbc014_crops, bundled_model_name, mantle_home, postgres_server,
                                           postgres_database):
    import psycopg2

    dagster_home = mantle_home / "dagster"
    # dagster-postgres's settings beside the ones mantle writes; a unix socket is libpq's host=. psycopg2 named:
    # SQLAlchemy 2.1 would otherwise load psycopg (3), which dagster-postgres does not install.
    url = f"postgresql+psycopg2://mantle@/{postgres_database}?host={postgres_server.socket_folder}"
    (dagster_home / "dagster.yaml").write_text(
        instance_settings(max_concurrent_runs=4, gpu_slots=1) + f"storage:\n  postgres:\n    postgres_url: {url}\n"
    )
    entity_id = mantle("register", str(bbbc014_crops), "--experiment", "postgres").stdout.split(":")[0]
    mantle("segment", entity_id, "--cellpose-model", bundled_model_name, "--nuclei-channel", "2",
           "--cytoplasm-channel", "2", "--diameter", "None")
    (masks,) = json.loads(mantle("entities", "--type", "segmentation_mask_directory", "--json").stdout)

    with psycopg2.connect(postgres_server.dsn(postgres_database)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_id, pipeline_name, status FROM runs")
        ((run_id, job, status),) = cursor.fetchall()
        cursor.execute("SELECT dagster_event_type, asset_key, partition FROM event_logs "
                       "WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'", [run_id])
        materialized = cursor.fetchall()
        cursor.execute("SELECT partition FROM dynamic_partitions")
        partitions = [partition for (partition,) in cursor.fetchall()]
        cursor.execute('SELECT concurrency_key, "limit" FROM concurrency_limits')
        pools = cursor.fetchall()
        cursor.execute("SELECT count(*) FROM concurrency_slots WHERE run_id IS NOT NULL")
        ((slots_held,),) = cursor.fetchall()
    assert (job, status) == ("segmentation_job", "SUCCESS")
    (partition,) = partitions
    assert partition.startswith(f"{entity_id} ")
    assert materialized == [("ASSET_MATERIALIZATION", '["segmentation_masks"]', partition)]
    lineage = json.loads(mantle("sql", "--json", "SELECT child_id, run_id FROM lineage").stdout)
    assert lineage == [{"child_id": masks["entity_id"], "run_id": run_id}]
    # The segmentation step's gpu pool lives in PostgreSQL too, and the run gave its slot back.
    assert pools == [("gpu", 1)] and slots_held == 0
    # Nothing went to the SQLite files of a default instance.
    assert not (dagster_home / "history").exists() and not list(dagster_home.rglob("*.db"))
