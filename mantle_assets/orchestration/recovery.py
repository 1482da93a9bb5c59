"""Cleaning up after runs whose process was killed (SIGKILL, OOM killer, power loss).

A run executed in a CLI process that dies never reports its end: Dagster keeps
it ``STARTED`` and keeps its ``gpu`` pool slot taken, so every later GPU step
would wait forever. Runs are tagged with the host and process that execute
them; before starting a run, the CLI fails those whose process is gone and
removes their local copies of URI directories and, under a URI mask root, masks
they uploaded but never recorded. Then runs of any origin that have ended, those
just failed included, have their pool slots freed and their hidden partial
outputs removed (:func:`release_ended_runs`).
"""

from __future__ import annotations

import os
import shutil
import socket

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from mantle_assets.atomic import PARTIAL_PREFIX
from mantle_assets.entities import EntityStore
from mantle_assets.settings import mantle_home, mask_root, staging_root
from mantle_assets.storage import is_uri, remove

HOST_TAG = "mantle/host"
PID_TAG = "mantle/pid"
PARTITION_TAG = "dagster/partition"
UNFINISHED = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
ENDED_BADLY = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED)


class RunEndedError(RuntimeError):
    """A step's run was failed or canceled while the step went on; its outputs must not be recorded."""


def check_run_not_ended(instance: DagsterInstance, run_id: str) -> None:
    """Raise :class:`RunEndedError` if run ``run_id`` is failed, canceled or being canceled.

    A step process can outlive its run: when a daemon run's worker is killed, Dagster marks
    the run failed, but the step's process may go on to the end. What it made then belongs to
    no live run and must not become anyone's current output. Called just before an output is
    recorded (see :meth:`~mantle_assets.entities.EntityStore.record_output`'s
    ``before_writing``).
    """
    run = instance.get_run_by_id(run_id)
    if run is not None and run.status in ENDED_BADLY:
        ended = "failed" if run.status == DagsterRunStatus.FAILURE else "canceled"
        raise RunEndedError(f"run {run_id} was marked {ended} while this step ran: its outputs are not recorded")


def process_run_tags() -> dict[str, str]:
    """Tags naming the host and process that execute a run in-process."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def fail_abandoned_runs(instance: DagsterInstance) -> list[str]:
    """Fail this host's unfinished in-process runs whose process has died; return their run ids.

    Their copies under ``$MANTLE_HOME/staging`` are removed, and so are their
    masks under a URI ``MANTLE_MASK_ROOT`` unless the entity was recorded before
    the process died. Failed, they have their pool slots and ``.partial-<run id>``
    folders released by :func:`release_ended_runs`, as every ended run has.
    """
    abandoned = []
    runs = instance.get_runs(filters=RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: socket.gethostname()}))
    for run in runs:
        pid = int(run.tags[PID_TAG])
        if process_alive(pid):
            continue
        instance.report_run_failed(run, message=f"process {pid} ended without finishing the run (killed?)")
        for pattern in (f"{run.run_id}-*", f"{PARTIAL_PREFIX}{run.run_id}-*"):
            for staged in staging_root().glob(pattern):
                shutil.rmtree(staged, ignore_errors=True)
        remove_unrecorded_upload(run)
        abandoned.append(run.run_id)
    return abandoned


def release_ended_runs(instance: DagsterInstance) -> list[str]:
    """Free what runs of any origin hold after they ended; return the ids of runs whose pool slots were freed.

    A run launched from the UI, a sensor or a schedule whose worker is killed is marked
    failed by Dagster, but its step's pool slot stays claimed, blocking every later step
    of the pool, and its ``.partial-<run id>`` folders stay. Slots of finished (or
    deleted) runs are freed, and their partial folders under ``$MANTLE_HOME`` and under
    a local ``MANTLE_MASK_ROOT`` outside it removed; those of unfinished runs, which may
    still be writing them, are left alone.
    """
    storage = instance.event_log_storage
    holders = set()
    for pool in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(pool)
        holders |= info.active_run_ids | info.pending_run_ids
    released = []
    for run_id in sorted(holders):
        if _ended(instance, run_id):
            storage.free_concurrency_slots_for_run(run_id)
            released.append(run_id)
    root = mask_root()
    partials = list(mantle_home().glob(f"*/*/{PARTIAL_PREFIX}*"))
    if not is_uri(root):
        partials += root.glob(f"*/{PARTIAL_PREFIX}*")
    for partial in partials:
        if _ended(instance, partial.name.removeprefix(PARTIAL_PREFIX)):
            shutil.rmtree(partial, ignore_errors=True)
    return released


def _ended(instance: DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is None or run.is_finished


def remove_unrecorded_upload(run: DagsterRun) -> None:
    """Delete what a dead run uploaded under a URI mask root, unless an entity records it.

    Object stores have no rename to hide an incomplete upload behind (see
    :func:`mantle_assets.atomic.output_directory`); a run's prefix is its own,
    so it can go. Nothing to do for a local mask root, or for a run without a
    partition.
    """
    root, entity_id = mask_root(), run.tags.get(PARTITION_TAG)
    if not is_uri(root) or entity_id is None:
        return
    if any(edge.run_id == run.run_id for edge in EntityStore().children(entity_id)):
        return  # died after recording: the masks are the entity's
    remove(f"{root}/{entity_id}/{run.run_id}")
