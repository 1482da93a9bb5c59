"""SIGTERM and SIGINT stop a `mantle segment` that waits for the gpu pool slot or segments, cleanly.

Real processes against one Dagster instance and entity store: a first run holds the
gpu slot (``MANTLE_GPUS=1``) segmenting a plate, a second one waits for the slot. The
waiting run must not burn CPU; a signal to either must end it with a one-line error,
its run failed, its slot free, no partial folder and nothing recorded.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from mantle_assets.atomic import PARTIAL_PREFIX
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.recovery import PID_TAG
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.conftest import bbbc014_images, missing_data
from mantle_assets_tests.test_crash_safety import wait_for_first_mask

pytestmark = pytest.mark.slow

WELLS = ("01-A-01", "02-A-02", "03-A-03", "04-A-04", "05-A-05", "06-A-06")
# Most CPU a run may use while it waits for the slot: Dagster's loop spun at 30-100 % of a core.
MAX_WAITING_CPU = 0.05
INTERRUPTED = "interrupted (SIGINT or SIGTERM): stopped and marked failed"


def segment(entity_id, model):
    return subprocess.Popen(
        [sys.executable, "-m", "mantle_assets.cli", "segment", entity_id,
         "--cellpose-model", model, "--diameter", "12"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=os.environ | {"MANTLE_GPUS": "1"},
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_of(instance, process):
    runs = instance.get_runs(filters=RunsFilter(tags={PID_TAG: str(process.pid)}))
    return runs[0] if runs else None


def wait_until_waiting_for_slot(instance, process, timeout=300):
    """Return the run of ``process`` once its step waits for the gpu slot."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = run_of(instance, process)
        if run is not None and run.run_id in instance.event_log_storage.get_concurrency_info("gpu").pending_run_ids:
            return run
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise AssertionError("the second run never waited for the gpu slot")


def plate(tmp_path, name, wells, size):
    """A plate of the DNA channel of ``wells``, each cut into ``size`` x ``size`` fields."""
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found")
    directory = tmp_path / name
    directory.mkdir()
    for well in wells:
        pixels = tifffile.imread(images / f"Channel2-{well}.tif")
        for y in range(0, pixels.shape[0] - size + 1, size):
            for x in range(0, pixels.shape[1] - size + 1, size):
                field = np.ascontiguousarray(pixels[y:y + size, x:x + size])
                tifffile.imwrite(directory / f"{well}-{y}-{x}.tif", field)
    return directory


def assert_stopped(process, instance, run_id):
    """The process ended on its signal with one line, its run failed and its slot is free."""
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    lines = err.strip().splitlines()
    assert lines[-1] == f"Error: segmentation_job run {run_id} {INTERRUPTED}", err
    assert "Traceback" not in err
    assert instance.get_run_by_id(run_id).status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert run_id not in info.active_run_ids | info.pending_run_ids


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_waiting_and_a_running_segment(tmp_path, mantle_home, bundled_model_name, signum):
    store = EntityStore()
    # 24 fields of 256 x 256: long enough that the first run still segments when the second is stopped.
    busy = register_image_directory(store, plate(tmp_path, "busy", WELLS, 256), "interrupts")
    small = register_image_directory(store, plate(tmp_path, "small", WELLS[:1], 160), "interrupts")
    busy_runs = mantle_home / "masks" / busy.entity_id

    holder = segment(busy.entity_id, bundled_model_name)
    wait_for_first_mask(busy_runs, holder)
    waiter = segment(small.entity_id, bundled_model_name)
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        waiting = wait_until_waiting_for_slot(instance, waiter)
        before, started = cpu_seconds(waiter.pid), time.monotonic()
        time.sleep(5)
        share = (cpu_seconds(waiter.pid) - before) / (time.monotonic() - started)
        assert share < MAX_WAITING_CPU, f"waiting run used {share:.0%} of a core"

        os.kill(waiter.pid, signum)
        assert_stopped(waiter, instance, waiting.run_id)
        assert holder.poll() is None, "the first run finished before it could be interrupted: give it more fields"
        running = run_of(instance, holder)
        os.kill(holder.pid, signum)
        assert_stopped(holder, instance, running.run_id)

    assert store.list("segmentation_mask_directory") == []
    assert store.children(busy.entity_id) == [] and store.children(small.entity_id) == []
    assert not busy_runs.exists() or [p.name for p in busy_runs.iterdir()] == []
    assert not [p for p in (mantle_home / "masks").rglob(f"{PARTIAL_PREFIX}*")]

    third = segment(small.entity_id, bundled_model_name)
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err
    (masks,) = store.list("segmentation_mask_directory")
    assert masks.properties["source_entity"] == small.entity_id
