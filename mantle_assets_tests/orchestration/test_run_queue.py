"""A run a person launches starts before a backlog of automatic runs (issue 15), through a real `mantle ui` and daemon.

At start-up the sensors may queue dozens of automatic runs; a scientist's run launched then must not wait behind them.
The instance's run queue (``orchestration/instance.py``) gives automatic runs a lower priority and fewer slots than
there are in all; here 30 automatic runs are queued through GraphQL before one hand-launched run, and the daemon's
queue must start the hand-launched run next, while no more than ``max_concurrent_runs - 1`` automatic runs are in
progress.
"""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from mantle_assets.orchestration.instance import automatic_run_tags
from mantle_assets_tests.test_ui_guard import UI, environment
from mantle_assets_tests.ui_server import running_ui

AUTOMATIC_RUNS = 30
MAX_RUNS = 2
DEQUEUE_SECONDS = 180
IN_PROGRESS = (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)


def launch(ui: UI, tags: dict[str, str]) -> str:
    """Launch the cheap observation job, as the launchpad does, with ``tags``; return the run id."""
    tag_list = ", ".join(f"{{key: {json.dumps(key)}, value: {json.dumps(value)}}}" for key, value in tags.items())
    mutation = (
        'mutation { launchRun(executionParams: {selector: {repositoryLocationName: "mantle_assets", '
        'repositoryName: "__repository__", jobName: "observe_image_directories_job"}, '
        f"executionMetadata: {{tags: [{tag_list}]}}}}) "
        "{ __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"
    )
    status, body = ui.graphql(mutation, Origin=f"http://{ui.host}")
    answer = json.loads(body)["data"]["launchRun"]
    assert status == 200 and answer["__typename"] == "LaunchRunSuccess", body
    return answer["run"]["runId"]


@pytest.mark.slow
def test_a_hand_launched_run_starts_before_queued_automatic_runs(tmp_path):
    home = tmp_path / "mantle home"
    with running_ui(tmp_path, tmp_path / "mantle-ui.log", environment(home, MANTLE_MAX_RUNS=str(MAX_RUNS))) as (url, _):
        ui = UI(urllib.parse.urlsplit(url).port, home / "dagster")
        automatic = [launch(ui, automatic_run_tags()) for _ in range(AUTOMATIC_RUNS)]
        with DagsterInstance.from_config(str(home / "dagster")) as instance:

            def automatic_dequeued() -> int:
                queued = RunsFilter(run_ids=automatic, statuses=[DagsterRunStatus.QUEUED])
                return AUTOMATIC_RUNS - instance.get_runs_count(queued)

            by_hand = launch(ui, {})
            before_hand = automatic_dequeued()
            deadline = time.monotonic() + DEQUEUE_SECONDS
            most_automatic_in_progress = 0
            while instance.get_run_by_id(by_hand).status == DagsterRunStatus.QUEUED:
                assert time.monotonic() < deadline, "the hand-launched run was never dequeued"
                in_progress = instance.get_runs_count(RunsFilter(run_ids=automatic, statuses=list(IN_PROGRESS)))
                most_automatic_in_progress = max(most_automatic_in_progress, in_progress)
                time.sleep(0.5)
            after_hand = automatic_dequeued()
    # Automatic runs may have started while the backlog was being queued, but none while a person's run waited.
    assert after_hand == before_hand < AUTOMATIC_RUNS
    assert most_automatic_in_progress <= MAX_RUNS - 1
