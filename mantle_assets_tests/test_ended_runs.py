"""Runs of any origin that ended (a UI or sensor run whose worker was killed) free their gpu slot and partial folders.

Dagster marks such a run failed but keeps its step's pool slot claimed and leaves its
``.partial-`` folder; the next `mantle segment` must free both, also for a mask root
outside ``$MANTLE_HOME``.
"""

import os
import subprocess
import sys

import pytest
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.test_utils import create_run_for_test

from mantle_assets.atomic import PARTIAL_PREFIX
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.instance import write_instance_settings
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.test_interrupts import WELLS, plate

pytestmark = pytest.mark.slow


def test_a_failed_run_holding_the_slot_is_released(tmp_path, mantle_home, bundled_model_name, monkeypatch):
    masks_root = tmp_path / "masks elsewhere"
    monkeypatch.setenv("MANTLE_MASK_ROOT", str(masks_root))
    store = EntityStore()
    source = register_image_directory(store, plate(tmp_path, "plate", WELLS[:1], 160), "ended runs")
    write_instance_settings(mantle_home / "dagster")
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        # What a killed daemon run leaves: failed, its step's slot still claimed, its partial folder.
        dead = create_run_for_test(instance, job_name="segmentation_job", status=DagsterRunStatus.FAILURE)
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        assert instance.event_log_storage.claim_concurrency_slot("gpu", dead.run_id, "segmentation_masks").is_claimed
        partial = masks_root / source.entity_id / f"{PARTIAL_PREFIX}{dead.run_id}"
        partial.mkdir(parents=True)
        (partial / "half_cp_masks.tif").write_bytes(b"")

        run = subprocess.run(
            [sys.executable, "-m", "mantle_assets.cli", "segment", source.entity_id,
             "--cellpose-model", bundled_model_name, "--diameter", "12"],
            capture_output=True, text=True, timeout=600, env=os.environ | {"MANTLE_GPUS": "1"},
        )
        assert run.returncode == 0, run.stderr
        assert f"run {dead.run_id} had ended but held a pool slot: freed" in run.stderr.splitlines()
        info = instance.event_log_storage.get_concurrency_info("gpu")
        assert dead.run_id not in info.active_run_ids | info.pending_run_ids
    assert not partial.exists()
    (masks,) = store.list("segmentation_mask_directory")
    assert masks.properties["mask_directory"].startswith(str(masks_root))
