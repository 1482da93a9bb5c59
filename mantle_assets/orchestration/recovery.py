"""Cleaning up after runs that ended badly: killed (SIGKILL, OOM killer, power loss), failed or canceled.

A run executed in a CLI process that dies never reports its end: Dagster keeps
it ``STARTED`` and keeps its ``gpu`` pool slot taken, so every later GPU step
would wait forever. Runs are tagged with the host and process that execute
them; before starting a run, the CLI fails those whose process is gone
(:func:`fail_abandoned_runs`) and frees what ended runs of any origin still hold
(:func:`release_ended_runs`). Daemon, UI, sensor and schedule runs are failed by
Dagster's run monitoring, which frees their pool slots; :data:`ended_run_cleanup_sensor`
cleans up after each failed or canceled run, whatever launched it. Both use
:func:`clean_up_ended_runs`, which removes what such a run left and no entity records.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.event_api import RunStatusChangeRecordsFilter

from mantle_assets.atomic import PARTIAL_PREFIX, UNRECORDED_SUFFIX
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.partitions import (
    entity_id_of,
    image_directory_partitions,
    keys_by_entity_id,
    partition_key,
)
from mantle_assets.registration import IMAGE_DIRECTORY
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
    """Fail this host's unfinished in-process runs whose process has died, and clean up after them.

    Returns their run ids. What they left is removed by :func:`clean_up_ended_runs`.
    """
    abandoned = []
    runs = instance.get_runs(filters=RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: socket.gethostname()}))
    for run in runs:
        pid = int(run.tags[PID_TAG])
        if process_alive(pid):
            continue
        instance.report_run_failed(run, message=f"process {pid} ended without finishing the run (killed?)")
        abandoned.append(run.run_id)
    clean_up_ended_runs(instance, abandoned)
    return abandoned


def release_ended_runs(instance: DagsterInstance) -> list[str]:
    """Clean up after ended runs of any origin that still hold a pool slot or a partial folder.

    Returns the ids of those that held a pool slot. A run launched from the UI, a sensor or
    a schedule whose worker is killed is marked failed by Dagster, but its step's pool slot
    stays claimed (until run monitoring, in ``dagster-daemon``, frees it), blocking every
    later step of the pool, and its ``.partial-<run id>`` folders stay. Runs that are
    unfinished, which may still be writing, are left alone.
    """
    storage = instance.event_log_storage
    holders = set()
    for pool in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(pool)
        holders |= info.active_run_ids | info.pending_run_ids
    writers = {partial.name.removeprefix(PARTIAL_PREFIX) for partial in _partial_folders("*")}
    ended = sorted(run_id for run_id in holders | writers if _ended(instance, run_id))
    clean_up_ended_runs(instance, ended)
    return [run_id for run_id in ended if run_id in holders]


def add_missing_partitions(instance: DagsterInstance) -> list[str]:
    """Add the Dagster partition of each unarchived image directory that lacks one; return their ids.

    Registering records the entity, then adds its partition: a register killed in between
    leaves an entity no run can segment. One comparison of the two id sets finds them.
    """
    store = EntityStore()
    partitioned = keys_by_entity_id(instance.get_dynamic_partitions(image_directory_partitions.name))
    missing = sorted(set(store.entity_ids(IMAGE_DIRECTORY)).difference(partitioned))
    if missing:
        keys = [partition_key(entity) for entity in store.list(IMAGE_DIRECTORY, entity_ids=missing)]
        instance.add_dynamic_partitions(image_directory_partitions.name, keys)
    return missing


def clean_up_ended_runs(instance: DagsterInstance, run_ids: Iterable[str]) -> None:
    """Free what ended runs hold and remove what they left that no entity records.

    For each run: its pool slots are freed; its ``.partial-`` folders and files and its copies under
    ``$MANTLE_HOME/staging`` are removed; output folders it renamed into place
    (``<mask root>/<entity>/<run id>``, ``$MANTLE_HOME/{measurements,readouts}/<entity>/<run id>``)
    are removed unless it recorded that output, and so are its uploads under a URI mask root and
    its contact sheets (``$MANTLE_HOME/previews/<entity>/<run id>.png``) of entities it recorded no output of;
    an unrecorded model (``$MANTLE_HOME/models/<name>/<run id>``), an hour of training, is only
    renamed to ``<run id>.unrecorded``. Which outputs are recorded is one store query for all
    the runs. Only for runs that have ended: a running one may still record what it wrote.
    """
    run_ids = sorted(set(run_ids))
    if not run_ids:
        return
    outputs = EntityStore().outputs_of_runs(run_ids)
    root = mask_root()
    output_roots = [mantle_home() / "measurements", mantle_home() / "readouts"]
    if not is_uri(root):
        output_roots.append(root)
    for run_id in run_ids:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        recorded = _recorded_paths(outputs.get(run_id, []))
        sources = {entity.properties.get("source_entity") for entity in outputs.get(run_id, [])}
        leftovers = {
            *_partial_folders(run_id),
            *staging_root().glob(f"{run_id}-*"),
            *staging_root().glob(f"{PARTIAL_PREFIX}{run_id}-*"),
            *(output for base in output_roots for output in base.glob(f"*/{run_id}")
              if not _records(recorded, str(output))),
            *(preview for preview in (mantle_home() / "previews").glob(f"*/{run_id}.png")
              if preview.parent.name not in sources),
        }
        for leftover in leftovers:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:  # a preview, or its partial
                leftover.unlink(missing_ok=True)
        for model in (mantle_home() / "models").glob(f"*/{run_id}"):
            aside = model.with_name(model.name + UNRECORDED_SUFFIX)
            if not _records(recorded, str(model)) and not aside.exists():
                os.replace(model, aside)
        run = instance.get_run_by_id(run_id)
        entity_id = entity_id_of(run.tags[PARTITION_TAG]) if run and PARTITION_TAG in run.tags else None
        upload = f"{root}/{entity_id}/{run_id}"
        if is_uri(root) and entity_id is not None and not _records(recorded, upload):
            # Object stores have no rename to hide an incomplete upload behind (see
            # mantle_assets.atomic.output_directory); the run's prefix is its own.
            remove(upload)


def _recorded_paths(entities: list) -> list[str]:
    """Every text property of ``entities``: the folders and files they record among them."""
    return [value for entity in entities for value in entity.properties.values() if isinstance(value, str)]


def _records(recorded: list[str], folder: str) -> bool:
    return any(value == folder or value.startswith(folder.rstrip("/") + "/") for value in recorded)


def _partial_folders(run_id: str) -> list[Path]:
    """``.partial-<run id>`` output folders and files under ``$MANTLE_HOME`` and a local mask root outside it."""
    root = mask_root()
    partials = list(mantle_home().glob(f"*/*/{PARTIAL_PREFIX}{run_id}"))
    if not is_uri(root):
        partials += root.glob(f"*/{PARTIAL_PREFIX}{run_id}")
    return partials


def _ended(instance: DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is None or run.is_finished


# Run-status events read per tick: a burst of ended runs is cleaned over a few ticks.
ENDED_RUNS_PER_TICK = 50
_ENDED_BADLY_EVENTS = (DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_CANCELED)


@sensor(
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
    description="Cleans up after each failed or canceled run, whatever launched it: frees its pool slots, "
    "removes its partial and staging folders and the outputs it never recorded (a model is set aside).",
)
def ended_run_cleanup_sensor(context: SensorEvaluationContext) -> SensorResult:
    # The cursor holds, per event type, the storage id of the last run-status event handled:
    # a tick reads only the events since, never the whole run history.
    cursors = json.loads(context.cursor) if context.cursor else {}
    ended = []
    for event_type in _ENDED_BADLY_EVENTS:
        after = cursors.get(event_type.name)
        records = context.instance.fetch_run_status_changes(
            RunStatusChangeRecordsFilter(event_type, after_storage_id=after), limit=ENDED_RUNS_PER_TICK, ascending=True
        ).records
        ended += [record.run_id for record in records]
        if records:
            cursors[event_type.name] = records[-1].storage_id
    clean_up_ended_runs(context.instance, ended)
    if not ended:
        return SensorResult(skip_reason="no run failed or was canceled since the last tick", cursor=context.cursor)
    context.log.info(f"cleaned up after {len(ended)} ended runs: {', '.join(sorted(set(ended)))}")
    return SensorResult(cursor=json.dumps(cursors))
