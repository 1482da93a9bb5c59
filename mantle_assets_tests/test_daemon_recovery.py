"""A sensor-launched run whose worker is SIGKILLed while it holds the gpu slot is cleaned up by the daemon alone.

A real `dagster-daemon` runs the code location: the new-image-directory sensor requests the
segmentation of a registered plate, the daemon launches the run's worker, whose step takes
the gpu slot and starts writing masks. The worker is then killed. With no CLI command, the
run must be failed, its slot freed by run monitoring, and its partial folder removed by
``ended_run_cleanup_sensor``; nothing is recorded.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from mantle_assets.atomic import PARTIAL_PREFIX
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.instance import write_instance_settings
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.test_crash_safety import wait_for_first_mask
from mantle_assets_tests.test_interrupts import WELLS, plate
from mantle_assets_tests.ui_server import stop_process_group

pytestmark = pytest.mark.slow

WORKSPACE = Path(__file__).resolve().parents[1] / "workspace.yaml"


def run_worker_pid(instance, run_id: str) -> int | None:
    """The process of run ``run_id``'s worker, as its multiprocess executor reports it."""
    for entry in instance.all_logs(run_id):
        found = re.search(r"multiprocess executor: parent process \(pid: (\d+)\)", entry.message or "")
        if found:
            return int(found.group(1))
    return None


def wait_for(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def test_a_killed_daemon_run_is_failed_freed_and_cleaned_without_the_cli(tmp_path, mantle_home, bundled_model_name):
    store = EntityStore()
    # 8 fields of 256 x 256: still segmenting when its worker is killed.
    source = register_image_directory(
        store, plate(tmp_path, "plate", WELLS[:2], 256), "daemon recovery",
        segmentation_defaults={"cellpose_model": bundled_model_name, "diameter": "12"},
    )
    write_instance_settings(mantle_home / "dagster")
    masks = mantle_home / "masks" / source.entity_id
    # Create and migrate the instance's databases first: the daemon and its code server, opening a new
    # SQLite instance together, would race on that.
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        instance.get_runs()
        instance.all_instigator_state()
        instance.event_log_storage.get_concurrency_keys()
    with (tmp_path / "daemon.log").open("w") as log:
        daemon = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(WORKSPACE)],
            cwd=WORKSPACE.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=os.environ | {"MANTLE_GPUS": "1"},
        )
    try:
        with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
            wait_for_first_mask(masks, daemon, timeout=600)
            (run,) = instance.get_runs()
            assert run.run_id in instance.event_log_storage.get_concurrency_info("gpu").active_run_ids
            os.kill(wait_for(lambda: run_worker_pid(instance, run.run_id), "no run worker found", 30), signal.SIGKILL)

            wait_for(lambda: instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE,
                     "the run was not marked failed", 120)
            failed_at = time.monotonic()

            def slot_free():
                info = instance.event_log_storage.get_concurrency_info("gpu")
                return run.run_id not in info.active_run_ids | info.pending_run_ids

            wait_for(slot_free, "run monitoring did not free the slot", 30)
            freed_after = time.monotonic() - failed_at
            wait_for(lambda: not list(masks.glob(f"{PARTIAL_PREFIX}*")), "the partial folder stayed", 120)
            print(f"slot freed {freed_after:.0f} s after the run was failed")
            assert freed_after < 20
    finally:
        stop_process_group(daemon)
    assert store.list("segmentation_mask_directory") == []
    assert not masks.exists() or list(masks.iterdir()) == []
