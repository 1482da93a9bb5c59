"""A daemon-style run (Dagster's multiprocess executor, which UI, sensor and schedule runs use) waiting for the gpu
slot sleeps.

Dagster 1.13's multiprocess loop re-checks its in-memory state without pause while every
step waits for a pool slot; the code location's executor makes it sleep. A real run worker
(`dagster job execute`, which runs the job with the location's executor in its own process)
waits for a slot another run claimed, must use under a tenth of a core, and must go on
once the slot is released.
"""

import json
import subprocess
import sys
import time

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.test_utils import create_run_for_test

from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.instance import write_instance_settings
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.recovery import PARTITION_TAG
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.test_interrupts import WELLS, cpu_seconds, plate

pytestmark = pytest.mark.slow

# Unpatched, the waiting worker used a whole core (its loop never sleeps).
MAX_WAITING_CPU = 0.10


def waiting_run_id(instance, process, timeout=300):
    """The id of the run that waits for the gpu slot, once it does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = instance.event_log_storage.get_concurrency_info("gpu").pending_run_ids
        if pending:
            (run_id,) = pending
            return run_id
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise AssertionError("the run never waited for the gpu slot")


def test_a_multiprocess_run_waiting_for_the_gpu_slot_sleeps_and_goes_on_when_it_is_free(
    tmp_path, mantle_home, bundled_model_name
):
    store = EntityStore()
    source = register_image_directory(store, plate(tmp_path, "plate", WELLS[:1], 160), "multiprocess waiting")
    write_instance_settings(mantle_home / "dagster")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(
        {"ops": {"segmentation_masks": {"config": {"cellpose_model": bundled_model_name, "diameter": "12"}}}}
    ))
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        instance.add_dynamic_partitions(image_directory_partitions.name, [source.entity_id])
        holder = create_run_for_test(instance, job_name="segmentation_job", status=DagsterRunStatus.STARTED)
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        assert instance.event_log_storage.claim_concurrency_slot("gpu", holder.run_id, "segmentation_masks").is_claimed

        worker = subprocess.Popen(
            [sys.executable, "-m", "dagster", "job", "execute", "-m", "mantle_assets.definitions",
             "-j", "segmentation_job", "-c", str(config), "--tags", json.dumps({PARTITION_TAG: source.entity_id})],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            run_id = waiting_run_id(instance, worker)
            before, started = cpu_seconds(worker.pid), time.monotonic()
            time.sleep(5)
            share = (cpu_seconds(worker.pid) - before) / (time.monotonic() - started)
            assert share < MAX_WAITING_CPU, f"the waiting run worker used {share:.0%} of a core"

            instance.event_log_storage.free_concurrency_slots_for_run(holder.run_id)
            _, err = worker.communicate(timeout=600)
        finally:
            if worker.poll() is None:
                worker.kill()
        assert worker.returncode == 0, err[-3000:]
        assert instance.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS
    (masks,) = store.list("segmentation_mask_directory")
    assert masks.properties["source_entity"] == source.entity_id
