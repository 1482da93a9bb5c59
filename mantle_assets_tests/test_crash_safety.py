"""A run killed with SIGKILL mid-segmentation leaves nothing registered and nothing visible.

The next run fails the abandoned one, frees its gpu pool slot (else the next GPU
step would wait forever) and removes its hidden partial directory.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from dagster import DagsterInstance, DagsterRunStatus

from mantle_assets.atomic import PARTIAL_PREFIX
from mantle_assets.entities import EntityStore
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.conftest import bbbc014_images, missing_data

pytestmark = pytest.mark.slow

WELLS = ("01-A-01", "02-A-02", "03-A-03", "04-A-04", "05-A-05", "06-A-06")


def segment(entity_id, model):
    return subprocess.Popen(
        [sys.executable, "-m", "mantle_assets.cli", "segment", entity_id,
         "--cellpose-model", model, "--diameter", "12"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def masks_in_progress(run_dirs) -> bool:
    try:
        return any(p.name.startswith(PARTIAL_PREFIX) and any(p.iterdir()) for p in run_dirs.iterdir())
    except FileNotFoundError:  # not created yet, or renamed while we looked
        return False


def wait_for_first_mask(run_dirs, process, timeout=600):
    """Return once a mask file exists in a partial directory (segmentation under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if masks_in_progress(run_dirs):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("segmentation never started")


def test_sigkill_mid_segmentation_leaves_no_entity_and_no_visible_output(tmp_path, mantle_home, bundled_model_name):
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found")
    plate = tmp_path / "plate"
    plate.mkdir()
    for well in WELLS:
        pixels = tifffile.imread(images / f"Channel2-{well}.tif")
        tifffile.imwrite(plate / f"{well}.tif", np.ascontiguousarray(pixels[:256, :256]))
    store = EntityStore()
    source = register_image_directory(store, plate, "crash")
    run_dirs = mantle_home / "masks" / source.entity_id

    victim = segment(source.entity_id, bundled_model_name)
    wait_for_first_mask(run_dirs, victim)
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL

    assert store.list("segmentation_mask_directory") == []
    assert store.children(source.entity_id) == []
    assert [p.name for p in run_dirs.iterdir() if not p.name.startswith(".")] == []

    survivor = segment(source.entity_id, bundled_model_name)
    out, err = survivor.communicate(timeout=900)
    assert survivor.returncode == 0, err
    (masks,) = store.list("segmentation_mask_directory")
    assert [p.name for p in run_dirs.iterdir()] == [masks.properties["run_id"]]
    assert sorted(p.name for p in (run_dirs / masks.properties["run_id"]).iterdir()) == [
        f"{well}_cp_masks.tif" for well in WELLS
    ]
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        statuses = {run.run_id: run.status for run in instance.get_runs()}
    assert sorted(status.value for status in statuses.values()) == ["FAILURE", "SUCCESS"]
    assert statuses[masks.properties["run_id"]] == DagsterRunStatus.SUCCESS
    (edge,) = store.children(source.entity_id)
    assert edge.child_id == masks.entity_id
