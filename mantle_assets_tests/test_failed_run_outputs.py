"""A step whose run was marked failed while it segmented records nothing and leaves no masks.

As when a daemon run's worker is killed: Dagster marks the run failed, but the
step goes on. Here a real `mantle segment` is segmenting when the instance marks
its run failed, as Dagster's run monitoring or a person in the UI would.
"""

import subprocess
import sys

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from mantle_assets.atomic import PARTIAL_PREFIX
from mantle_assets.entities import EntityStore
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.test_crash_safety import wait_for_first_mask
from mantle_assets_tests.test_interrupts import WELLS, plate, run_of

pytestmark = pytest.mark.slow


def test_a_run_failed_while_its_step_segments_records_nothing(tmp_path, mantle_home, bundled_model_name):
    store = EntityStore()
    # 8 fields of 256 x 256: the run is marked failed after the first, well before the step records.
    source = register_image_directory(store, plate(tmp_path, "plate", WELLS[:2], 256), "failed run")
    run_dirs = mantle_home / "masks" / source.entity_id
    process = subprocess.Popen(
        [sys.executable, "-m", "mantle_assets.cli", "segment", source.entity_id,
         "--cellpose-model", bundled_model_name, "--diameter", "12"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for_first_mask(run_dirs, process)
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        run = run_of(instance, process)
        instance.report_run_failed(run, message="marked failed by the test while its step segments")
        _, err = process.communicate(timeout=900)
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE

    assert process.returncode == 1
    assert err.strip().splitlines()[-1] == (
        f"Error: segmentation_job run {run.run_id} failed: run {run.run_id} was marked failed while this step "
        "ran: its outputs are not recorded"
    ), err
    assert store.list("segmentation_mask_directory") == []
    assert store.children(source.entity_id) == []
    assert not run_dirs.exists() or list(run_dirs.iterdir()) == []
    assert not list((mantle_home / "masks").rglob(f"{PARTIAL_PREFIX}*"))
    # The contact sheet, written just before the record was refused, went with it; its folder stays, empty.
    assert list((mantle_home / "previews" / source.entity_id).iterdir()) == []
