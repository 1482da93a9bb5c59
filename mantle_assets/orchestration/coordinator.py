"""The run queue: Dagster's, refusing before it queues a run whose request cannot work.

A launch from the launchpad or the asset graph, a backfill's run, a sensor's or a schedule's: every run
submitted to the instance reaches the run coordinator first. A run asked for what its steps would refuse
in their first second (an unknown model, a channel beyond the images, a nuclei model asked for whole
cells) is marked failed there, its one-line reason the failure's message, so that the run page shows the
reason and nothing else, and the run never takes a place in the queue. The check is the steps' own
(:func:`~mantle_assets.orchestration.assets.refused_requests`,
:func:`~mantle_assets.orchestration.cells.checked_cell_request`); the steps keep it for runs that reach
no queue (``mantle segment``, in-process execution).
"""

from __future__ import annotations

import logging

from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import refused_requests, resolve_model_without_download, segmentation_masks
from mantle_assets.orchestration.cells import CellConfig, cell_masks, checked_cell_request
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.partitions import image_directory_partitions, keys_by_entity_id
from mantle_assets.orchestration.retries import REFUSALS

# The launch waits at most this long for a store another process holds; then the run is queued unchecked
# and its step checks it.
STORE_WAIT_SECONDS = 5.0

logger = logging.getLogger("mantle.run_queue")
SEGMENTATION_STEP = segmentation_masks.op.name
CELL_STEP = cell_masks.op.name


class RefusingRunCoordinator(QueuedRunCoordinator):
    """Dagster's :class:`QueuedRunCoordinator` (same settings), failing at submission a run its steps would refuse."""

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        if run.status == DagsterRunStatus.NOT_STARTED:
            reason = refusal(self._instance, run)
            if reason is not None:
                self._instance.report_run_failed(run, message=reason)
                return self._instance.get_run_by_id(run.run_id)
        return super().submit_run(context)


def refusal(instance: DagsterInstance, run: DagsterRun) -> str | None:
    """Why the run's segmentation or cell step would refuse what it is asked for, in one line; None to queue it.

    Only refusals refuse: a store busy for longer than ``STORE_WAIT_SECONDS``, or anything else that goes
    wrong while checking, queues the run, whose step checks again and fails with its own error if it must.
    """
    try:
        steps = steps_to_execute(instance, run)
        if not steps & {SEGMENTATION_STEP, CELL_STEP}:
            return None
        entity_ids = list(keys_by_entity_id(partition_keys(instance, run)))
        store = EntityStore(lock_timeout=STORE_WAIT_SECONDS)
        try:
            if SEGMENTATION_STEP in steps:
                config = SegmentationConfig(**op_config(run, SEGMENTATION_STEP))
                refused_requests(store, entity_ids, config, resolve_model_without_download)
            elif len(entity_ids) == 1:  # cells alone, of their current nuclei; a run makes cells of one partition
                checked_cell_request(
                    store, entity_ids[0], CellConfig(**op_config(run, CELL_STEP)), resolve_model_without_download
                )
        except REFUSALS as error:
            return str(error).splitlines()[0]
    except Exception:  # noqa: BLE001 - the check must never stop a launch; the step checks again
        logger.warning(f"run {run.run_id} queued unchecked", exc_info=True)
    return None


def steps_to_execute(instance: DagsterInstance, run: DagsterRun) -> set[str]:
    """The keys of the steps the run will execute, from its execution plan (an asset's step is named as the asset)."""
    if run.execution_plan_snapshot_id is None:
        return set()
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    return set(plan.step_keys_to_execute)


def partition_keys(instance: DagsterInstance, run: DagsterRun) -> list[str]:
    """The image-directory partitions of the run: its partition, or those of its range (a batched backfill's)."""
    if PARTITION_NAME_TAG in run.tags:
        return [run.tags[PARTITION_NAME_TAG]]
    if ASSET_PARTITION_RANGE_START_TAG in run.tags and ASSET_PARTITION_RANGE_END_TAG in run.tags:
        keys = image_directory_partitions.get_partition_keys(dynamic_partitions_store=instance)
        first, last = run.tags[ASSET_PARTITION_RANGE_START_TAG], run.tags[ASSET_PARTITION_RANGE_END_TAG]
        return keys[keys.index(first) : keys.index(last) + 1]
    return []


def op_config(run: DagsterRun, step: str) -> dict:
    return ((run.run_config.get("ops") or {}).get(step) or {}).get("config") or {}
