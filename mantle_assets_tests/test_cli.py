"""The `mantle` command, run as a user runs it: a subprocess against fresh state."""

import json
import os
import subprocess
import sys

import duckdb
import pytest
from dagster import DagsterInstance

pytestmark = pytest.mark.slow


def mantle(*args, check=True):
    completed = subprocess.run(
        [sys.executable, "-m", "mantle_assets.cli", *args],
        capture_output=True, text=True, env=os.environ.copy(), timeout=900,
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"mantle {' '.join(args)} failed:\n{completed.stderr}")
    return completed


def dagster_runs(mantle_home):
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        return instance.get_runs()


def test_register_then_segment_round_trip(bbbc014_crops, bundled_model_name, mantle_home):
    entity_id = mantle("register", str(bbbc014_crops), "--experiment", "dose ends").stdout.strip()
    assert entity_id == "E000001"
    shown = json.loads(mantle("show", entity_id, "--json").stdout)
    grouping = shown["properties"]["field_grouping"]
    assert (grouping["n_fields"], grouping["n_channels"]) == (2, 2)

    mantle("segment", entity_id, "--cellpose-model", bundled_model_name, "--nuclei-channel", "2",
           "--cytoplasm-channel", "2", "--diameter", "None")
    (masks,) = json.loads(mantle("entities", "--type", "segmentation_mask_directory", "--json").stdout)
    (run,) = dagster_runs(mantle_home)
    assert run.job_name == "segmentation_job" and run.tags["dagster/partition"] == entity_id

    with duckdb.connect(str(mantle_home / "mantle.duckdb"), read_only=True) as db:
        entities = dict(db.execute("SELECT entity_id, data_type FROM entities").fetchall())
        lineage = db.execute("SELECT parent_id, child_id, pipeline, run_id FROM lineage").fetchall()
    assert entities == {entity_id: "image_directory", masks["entity_id"]: "segmentation_mask_directory"}
    assert lineage == [(entity_id, masks["entity_id"], "cellpose-segmentation", run.run_id)]


def test_unknown_model_exits_non_zero_and_records_nothing(bbbc014_crops, mantle_home):
    entity_id = mantle("register", str(bbbc014_crops), "--experiment", "x").stdout.strip()
    failed = mantle("segment", entity_id, "--cellpose-model", "nosuchmodel", "--nuclei-channel", "2",
                    "--cytoplasm-channel", "2", "--diameter", "None", check=False)
    assert failed.returncode != 0
    error_lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and "unknown cellpose_model 'nosuchmodel'" in error_lines[0]
    assert [e["entity_id"] for e in json.loads(mantle("entities", "--json").stdout)] == [entity_id]
    assert dagster_runs(mantle_home) == []


def test_register_refuses_a_directory_without_images(tmp_path, mantle_home):
    empty = tmp_path / "nothing here"
    empty.mkdir()
    failed = mantle("register", str(empty), check=False)
    assert failed.returncode != 0 and "no images in" in failed.stderr
    assert json.loads(mantle("entities", "--json").stdout) == []


def test_models_json_lists_bundled_offline(bundled_model_name):
    listed = {m["name"]: m for m in json.loads(mantle("models", "--json").stdout)}
    assert listed[bundled_model_name]["offline"] is True
    assert listed[bundled_model_name]["kind"] == "bundled"
    assert os.path.isfile(listed[bundled_model_name]["path"])
    assert {"nuclei", "cyto3"} <= set(listed)
