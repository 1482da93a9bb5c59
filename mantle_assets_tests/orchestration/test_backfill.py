"""A real asset backfill of several partitions, driven by Dagster's own daemon logic.

The backfill daemon's and the run queue's iterations run in the test process
against the code location served from a subprocess; the default run launcher
starts each dequeued run in its own process, where the job's multiprocess
executor runs the step in yet another. The asset's BackfillPolicy batches the
partitions into runs of ``MANTLE_PLATES_PER_RUN``. Every entity and lineage edge
must be recorded.
"""

import logging
import time

import pytest
from dagster import AssetKey, DagsterRunStatus
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.test_utils import create_test_daemon_workspace_context
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.backfill import execute_backfill_iteration
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from dagster_shared.error import SerializableErrorInfo

from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets_tests.conftest import EIGHT_WELLS, register_crop_per_well

pytestmark = pytest.mark.slow

def run_partitions(run, partition_keys) -> list[str]:
    if "dagster/partition" in run.tags:
        return [run.tags["dagster/partition"]]
    first, last = run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]
    return partition_keys[partition_keys.index(first) : partition_keys.index(last) + 1]


def test_backfill_of_eight_partitions_records_every_entity_and_edge(
    tmp_path, instance, bundled_model_name, monkeypatch
):
    # Read where the code location loads the definitions: the asset's BackfillPolicy.
    monkeypatch.setenv("MANTLE_PLATES_PER_RUN", "3")
    store = EntityStore()
    # Eight partitions at once: the queue of a test instance has no run limit.
    sources = register_crop_per_well(tmp_path, store, EIGHT_WELLS, "backfill")
    partition_keys = [entity.entity_id for entity in sources]
    instance.add_dynamic_partitions(image_directory_partitions.name, partition_keys)
    target = ModuleTarget(
        module_name="mantle_assets.definitions", attribute="defs", working_directory=None, location_name="mantle"
    )
    config = {"cellpose_model": bundled_model_name, "nuclei_channel": 0, "cytoplasm_channel": 0, "diameter": "12"}

    with create_test_daemon_workspace_context(target, instance) as workspace:
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id="nightly",
            asset_graph=workspace.create_request_context().asset_graph,
            partition_names=partition_keys,
            asset_selection=[AssetKey("segmentation_masks")],
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=None,
            description=None,
            run_config={"ops": {"segmentation_masks": {"config": config}}},
        )
        instance.add_backfill(backfill)
        run_queue = QueuedRunCoordinatorDaemon(interval_seconds=1)
        deadline = time.monotonic() + 1200
        while instance.get_backfill("nightly").status == BulkActionStatus.REQUESTED:
            assert time.monotonic() < deadline, "backfill did not finish"
            errors = [e for e in execute_backfill_iteration(workspace, logging.getLogger("backfill")) if e]
            errors += [e for e in run_queue.run_iteration(workspace) if isinstance(e, SerializableErrorInfo)]
            assert not errors, errors
            time.sleep(2)

    assert instance.get_backfill("nightly").status == BulkActionStatus.COMPLETED_SUCCESS
    runs = instance.get_runs()
    # Batched by the asset's BackfillPolicy: three runs of at most three partitions, not eight.
    batches = sorted(run_partitions(r, partition_keys) for r in runs)
    assert len(batches) == 3 and all(len(batch) <= 3 for batch in batches)
    assert sorted(key for batch in batches for key in batch) == sorted(partition_keys)
    assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
    for run in runs:
        logs = [e.message or "" for e in instance.all_logs(run.run_id)]
        assert any("multiprocess executor" in message for message in logs), run.run_id

    masks = store.list("segmentation_mask_directory")
    assert sorted(m.properties["source_entity"] for m in masks) == sorted(partition_keys)
    run_ids = {r.run_id for r in runs}
    for source in sources:
        (edge,) = store.children(source.entity_id)
        assert edge.run_id in run_ids
