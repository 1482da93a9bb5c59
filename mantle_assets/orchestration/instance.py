"""The local Dagster instance's settings: a run queue and the gpu pool's size."""

from __future__ import annotations

import os
from pathlib import Path

from mantle_assets.settings import gpu_count

DEFAULT_MAX_CONCURRENT_RUNS = 4


def instance_settings(*, max_concurrent_runs: int, gpu_slots: int) -> str:
    """``dagster.yaml`` text for the local deployment.

    Runs queue beyond ``max_concurrent_runs``; steps in the ``gpu`` pool (the
    only pool) run at most ``gpu_slots`` at a time across all runs.
    """
    return (
        "# Written by mantle on first use; edit freely (mantle never overwrites it).\n"
        "concurrency:\n"
        "  runs:\n"
        f"    max_concurrent_runs: {max_concurrent_runs}\n"
        "  pools:\n"
        f"    default_limit: {gpu_slots}\n"
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
