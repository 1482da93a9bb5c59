"""The local Dagster instance's settings: a run queue that puts people first, the gpu pool's size, run monitoring."""

from __future__ import annotations

import os
from pathlib import Path

from mantle_assets.settings import gpu_count

DEFAULT_MAX_CONCURRENT_RUNS = 4

# Sensors and schedules tag the runs they request with these (see ``automatic_run_tags``).
ORIGIN_TAG = "mantle/origin"
AUTOMATIC = "automatic"
# Dagster's queue starts runs of higher ``dagster/priority`` first; runs without the tag have 0.
AUTOMATIC_PRIORITY = -1


def automatic_run_tags() -> dict[str, str]:
    """Tags of a run that no person asked for: it queues behind hand-launched runs and never takes every slot."""
    return {ORIGIN_TAG: AUTOMATIC, "dagster/priority": str(AUTOMATIC_PRIORITY)}


def instance_settings(*, max_concurrent_runs: int, gpu_slots: int) -> str:
    """``dagster.yaml`` text for the local deployment.

    Runs queue beyond ``max_concurrent_runs``. Automatic runs (sensors, schedules) start
    after hand-launched ones and hold at most ``max_concurrent_runs - 1`` slots, so a run
    a person launches behind a backlog of automatic ones starts at the next free slot
    (with one slot in all, automatic runs may take it). The queue is Dagster's with a check
    before it: a run whose request cannot work fails there with its one-line reason and is
    never queued (:class:`~mantle_assets.orchestration.coordinator.RefusingRunCoordinator`).
    Steps in the ``gpu`` pool (the only pool) run at most ``gpu_slots`` at a time across all
    runs. Run monitoring (in
    ``dagster-daemon``) fails runs stuck starting or canceling and frees the pool slots
    a run still holds 5 s after it ended, e.g. when its worker was killed.
    """
    automatic_limit = max(1, max_concurrent_runs - 1)
    return (
        "# Written by mantle on first use; edit freely (mantle never overwrites it).\n"
        "run_coordinator:\n"
        "  module: mantle_assets.orchestration.coordinator\n"
        "  class: RefusingRunCoordinator\n"
        "concurrency:\n"
        "  runs:\n"
        f"    max_concurrent_runs: {max_concurrent_runs}\n"
        "    tag_concurrency_limits:\n"
        f"      - key: {ORIGIN_TAG}\n"
        f"        value: {AUTOMATIC}\n"
        f"        limit: {automatic_limit}\n"
        "  pools:\n"
        f"    default_limit: {gpu_slots}\n"
        "run_monitoring:\n"
        "  enabled: true\n"
        "  start_timeout_seconds: 180\n"
        "  cancel_timeout_seconds: 180\n"
        "  poll_interval_seconds: 10\n"
        "  free_slots_after_run_end_seconds: 5\n"
    )


def write_instance_settings(dagster_home: Path) -> Path:
    """Create ``dagster.yaml`` unless one exists; sizes come from ``MANTLE_MAX_RUNS``/``MANTLE_GPUS``."""
    settings = dagster_home / "dagster.yaml"
    if not settings.exists():
        dagster_home.mkdir(parents=True, exist_ok=True)
        settings.write_text(
            instance_settings(
                max_concurrent_runs=int(os.environ.get("MANTLE_MAX_RUNS", DEFAULT_MAX_CONCURRENT_RUNS)),
                gpu_slots=gpu_count(),
            )
        )
    return settings
