"""The run queue refuses a run whose request cannot work before it is queued (issue 15).

A real instance configured as `mantle` writes it (``dagster.yaml`` naming the refusing coordinator), the code
location served as the webserver and the daemon serve it, runs launched through Dagster's own GraphQL
``launchRun`` (what the launchpad sends) and a real asset backfill driven by the backfill daemon's iteration.
"""

from __future__ import annotations

import logging
import time

import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.test_utils import create_test_daemon_workspace_context
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.backfill import execute_backfill_iteration
from dagster_graphql.test.utils import execute_dagster_graphql

from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.coordinator import RefusingRunCoordinator
from mantle_assets.orchestration.instance import write_instance_settings
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets_tests.conftest import register_crop_per_well

LOCATION = "mantle"
TARGET = ModuleTarget(module_name="mantle_assets.definitions", attribute="defs", working_directory=None,
                      location_name=LOCATION)
LAUNCH = """
mutation($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""
# The plates are one-channel crops: channel 3 is beyond them.
BAD = {"nuclei_channel": 3}
NOT_THERE = "nuclei_channel=3 but the images have 1 channel(s)"


@pytest.fixture
def mantle_instance(mantle_home):
    """The instance of $DAGSTER_HOME with the settings `mantle` writes there."""
    write_instance_settings(mantle_home / "dagster")
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        assert isinstance(instance.run_coordinator, RefusingRunCoordinator)
        yield instance


def launch(workspace, partition: str, config: dict) -> str:
    """``segmentation_job`` for ``partition`` with ``config``, launched as the launchpad launches; the run id."""
    result = execute_dagster_graphql(workspace.create_request_context(), LAUNCH, {"executionParams": {
        "selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__",
                     "jobName": "segmentation_job"},
        "runConfigData": {"ops": {"segmentation_masks": {"config": config}}},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
    }})
    answer = result.data["launchRun"]
    assert answer["__typename"] == "LaunchRunSuccess", answer
    return answer["run"]["runId"]


def run_events(instance: DagsterInstance, run_id: str) -> list:
    """The run's events after its creation (which records the materializations it plans)."""
    return [
        entry for entry in instance.all_logs(run_id)
        if entry.dagster_event is not None
        and entry.dagster_event.event_type != DagsterEventType.ASSET_MATERIALIZATION_PLANNED
    ]


def assert_refused(instance: DagsterInstance, run_id: str) -> str:
    """The run failed with nothing but its failure event, one line and no error; that line is returned."""
    run = instance.get_run_by_id(run_id)
    (failure,) = run_events(instance, run_id)
    assert run.status == DagsterRunStatus.FAILURE
    assert failure.dagster_event.event_type == DagsterEventType.RUN_FAILURE
    assert failure.error_info is None and failure.dagster_event.event_specific_data is None
    reason = failure.dagster_event.message
    assert "\n" not in reason
    return reason


def test_a_launch_that_cannot_work_fails_with_its_reason_and_is_never_queued(tmp_path, mantle_instance):
    (plate,) = register_crop_per_well(tmp_path, EntityStore(), ["01-A-01"], "refused at launch")
    mantle_instance.add_dynamic_partitions(image_directory_partitions.name, [plate.entity_id])
    with create_test_daemon_workspace_context(TARGET, mantle_instance) as workspace:
        refused = launch(workspace, plate.entity_id, BAD)
        unknown_model = launch(workspace, plate.entity_id, {"cellpose_model": "no-such-model"})
        queued = launch(workspace, plate.entity_id, {"nuclei_channel": 1, "cytoplasm_channel": 1})

    assert assert_refused(mantle_instance, refused) == NOT_THERE
    assert "no-such-model" in assert_refused(mantle_instance, unknown_model)
    # A request that can work is queued as before, for the daemon to start.
    assert mantle_instance.get_run_by_id(queued).status == DagsterRunStatus.QUEUED
    assert [e.dagster_event.event_type for e in run_events(mantle_instance, queued)] == [DagsterEventType.RUN_ENQUEUED]


@pytest.mark.slow
def test_a_backfill_of_a_config_that_cannot_work_is_refused_run_by_run(tmp_path, mantle_instance, monkeypatch):
    # Read where the code location loads the definitions: two plates per backfill run, so one run covers a range.
    monkeypatch.setenv("MANTLE_PLATES_PER_RUN", "2")
    plates = register_crop_per_well(tmp_path, EntityStore(), ["01-A-01", "02-A-02", "03-A-03"], "refused backfill")
    keys = [plate.entity_id for plate in plates]
    mantle_instance.add_dynamic_partitions(image_directory_partitions.name, keys)
    with create_test_daemon_workspace_context(TARGET, mantle_instance) as workspace:
        mantle_instance.add_backfill(PartitionBackfill.from_asset_partitions(
            backfill_id="refused",
            asset_graph=workspace.create_request_context().asset_graph,
            partition_names=keys,
            asset_selection=[AssetKey("segmentation_masks")],
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=mantle_instance,
            all_partitions=False,
            title=None,
            description=None,
            run_config={"ops": {"segmentation_masks": {"config": BAD}}},
        ))
        deadline = time.monotonic() + 300
        while mantle_instance.get_backfill("refused").status == BulkActionStatus.REQUESTED:
            assert time.monotonic() < deadline, "backfill did not finish"
            list(execute_backfill_iteration(workspace, logging.getLogger("backfill")))
            time.sleep(1)

    assert mantle_instance.get_backfill("refused").status == BulkActionStatus.COMPLETED_FAILED
    runs = mantle_instance.get_runs()
    reasons = sorted(assert_refused(mantle_instance, run.run_id) for run in runs)
    # No queue daemon ran: each run was failed at submission, none was left queued.
    assert len(runs) == 2
    assert reasons == sorted([
        f"all 2 image directories refused: {keys[0]}: {NOT_THERE}; {keys[1]}: {NOT_THERE}", NOT_THERE])
