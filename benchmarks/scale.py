"""Bookkeeping at scale: sensor and schedule ticks, CLI and UI queries for N registered plates.

Each N gets a fresh MANTLE_HOME and DAGSTER_HOME under ``--work``. The plates
are one-field folders (one 8x8 TIFF each), so the figures are the platform's
bookkeeping, not image I/O. The first ``--one-by-one`` plates are registered
as ``mantle register`` does (reading the images); the rest through
:meth:`EntityStore.register_many`, with the grouping of the first plate
(the plates are alike) and each folder's own fingerprint.

Usage::

    python benchmarks/scale.py --plates 100 1000 10000 --work runs/scale

Prints one table row per N, then each column's growth per plate between the
smallest and largest N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import tifffile

# The Partitions tab's query, as dagster-webserver 1.13's UI sends it (PartitionHealthQuery).
PARTITION_HEALTH_QUERY = """
query PartitionHealthQuery($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id
      partitionKeysByDimension { name type partitionKeys }
      assetPartitionStatuses {
        ... on TimePartitionStatuses { ranges { status startTime endTime startKey endKey } }
        ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
        ... on MultiPartitionStatuses { primaryDimensionName }
      }
    }
  }
}
"""

NEW_PLATES = 10
MASK_VERSIONS = 10
MATERIALIZATIONS = 200
NIGHT = datetime(2026, 12, 2, 2, tzinfo=UTC)
QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

COLUMNS = {
    "register_ms_per_plate": "registration, one by one (ms/plate)",
    "bulk_register_ms_per_plate": "registration, bulk (ms/plate)",
    "sensor_first_s": "new-directory sensor, first tick, all N new (s)",
    "sensor_new_s": f"new-directory sensor, {NEW_PLATES} new (s)",
    "sensor_idle_s": "new-directory sensor, idle (s)",
    "schedule_all_stale_s": "stale schedule, all stale (s)",
    "observation_run_s": "observation run, all N (s)",
    "schedule_none_stale_s": "stale schedule, none stale (s)",
    "measure_sensor_s": f"measurement sensor, {MATERIALIZATIONS} new masks (s)",
    "measure_sensor_idle_s": "measurement sensor, idle (s)",
    "cli_entities_s": "mantle entities --json (s)",
    "cli_show_s": f"mantle show, {MASK_VERSIONS} versions (s)",
    "lineage_ms": "lineage: descendants + ancestors (ms)",
    "graphql_partitions_s": "UI Partitions tab query (s)",
}


def timed(function: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def write_plate(directory: Path) -> Path:
    directory.mkdir(parents=True)
    tifffile.imwrite(directory / "A01_s1.tif", np.full((8, 8), 7, np.uint8))
    return directory


def apply_partition_requests(instance, result) -> None:
    """What the daemon does with a sensor's partition requests."""
    from dagster import AddDynamicPartitionsRequest

    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)


def record_masks(store, plate, run_id: str, folder: Path) -> object:
    """What a segmentation run with the plate's defaults records (see segment_partition)."""
    from mantle_assets.models.registry import resolve_model
    from mantle_assets.orchestration.assets import MASK_DIRECTORY, SEGMENTATION_PIPELINE
    from mantle_assets.orchestration.sensors import default_segmentation_config
    from mantle_assets.registration import directory_fingerprint

    config = default_segmentation_config(plate)
    folder.mkdir(parents=True, exist_ok=True)
    extra = {name: getattr(config, name) for name in ("flow_threshold", "cellprob_threshold", "min_size")}
    return store.record_output(
        MASK_DIRECTORY,
        f"{plate.name} masks",
        {
            "mask_directory": str(folder),
            "source_entity": plate.entity_id,
            **config.parameters(),
            "extra_parameters": extra,
            "source_fingerprint": directory_fingerprint(plate.properties["image_directory"])[1],
            "model_sha256": resolve_model(config.cellpose_model).weights_sha256(),
            "run_id": run_id,
        },
        parents=[plate.entity_id],
        pipeline=SEGMENTATION_PIPELINE,
        run_id=run_id,
        parameters=config.parameters(),
    )


def cli(*arguments: str) -> float:
    """Seconds one ``mantle`` command takes, start-up included."""
    mantle = shutil.which("mantle") or str(Path(sys.executable).with_name("mantle"))
    start = time.perf_counter()
    subprocess.run([mantle, *arguments], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(plates: int, work: Path, one_by_one: int, figures: dict[str, float], quick: bool = False) -> None:
    """Fill ``figures`` (see COLUMNS) for ``plates`` plates; each is printed to stderr once measured."""
    from dagster import AssetMaterialization, DagsterInstance, build_schedule_context, build_sensor_context

    from mantle_assets.definitions import defs
    from mantle_assets.entities import EntityStore
    from mantle_assets.imaging.fields import group_fields
    from mantle_assets.orchestration.assets import segmentation_masks
    from mantle_assets.orchestration.partitions import partition_key
    from mantle_assets.orchestration.schedules import stale_segmentation_schedule
    from mantle_assets.orchestration.sensors import new_image_directory_sensor, segmented_directory_sensor
    from mantle_assets.registration import IMAGE_DIRECTORY, image_directory_properties, register_image_directory

    home = work / f"n{plates}"
    shutil.rmtree(home, ignore_errors=True)
    os.environ["MANTLE_HOME"] = str(home / "mantle")
    os.environ["DAGSTER_HOME"] = str(home / "mantle" / "dagster")
    os.environ.pop("MANTLE_ENTITY_STORE", None)
    (home / "mantle" / "dagster").mkdir(parents=True)
    store = EntityStore()

    folders = [write_plate(home / "plates" / f"plate{i:05d}") for i in range(plates + NEW_PLATES)]
    first = min(one_by_one, plates)
    _, seconds = timed(lambda: [register_image_directory(store, folder, "scale") for folder in folders[:first]])
    figures["register_ms_per_plate"] = 1000 * seconds / max(first, 1)
    grouping = group_fields(folders[0])

    def bulk(batch: list[Path]) -> list:
        return store.register_many(
            IMAGE_DIRECTORY,
            [(folder.name, image_directory_properties(folder, grouping, "scale")) for folder in batch],
        )

    _, seconds = timed(lambda: bulk(folders[first:plates]))
    figures["bulk_register_ms_per_plate"] = 1000 * seconds / max(plates - first, 1)

    with DagsterInstance.get() as instance:

        def sensor_tick(cursor):
            context = build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources)
            result, seconds = timed(lambda: new_image_directory_sensor(context))
            apply_partition_requests(instance, result)
            return result, seconds

        result, figures["sensor_first_s"] = sensor_tick(None)
        assert len(result.run_requests) == plates, len(result.run_requests)
        bulk(folders[plates:])
        result, figures["sensor_new_s"] = sensor_tick(result.cursor)
        assert len(result.run_requests) == NEW_PLATES
        idle, figures["sensor_idle_s"] = sensor_tick(result.cursor)
        assert not idle.run_requests

        def schedule_tick() -> list:
            context = build_schedule_context(
                instance=instance, resources=defs.resources, scheduled_execution_time=NIGHT
            )
            requests, seconds = timed(lambda: stale_segmentation_schedule(context))
            return requests, seconds

        requests, figures["schedule_all_stale_s"] = schedule_tick()
        assert requests
        if quick:
            return

        entities = store.list(IMAGE_DIRECTORY)
        masks_root = home / "masks"
        with store.session():  # setup, not measured: one connection for all the records
            for plate in entities:
                record_masks(store, plate, f"run-{plate.entity_id}", masks_root / plate.entity_id)
            for version in range(2, MASK_VERSIONS + 1):  # each run's own folder and run id: a new version
                shown = record_masks(store, entities[0], f"run-v{version}", masks_root / f"v{version}")
        assert shown.version == MASK_VERSIONS, shown.version

        observed, figures["observation_run_s"] = timed(
            lambda: defs.resolve_job_def("observe_image_directories_job").execute_in_process(
                instance=instance, run_config=QUIET_RUN
            )
        )
        assert observed.success
        requests, figures["schedule_none_stale_s"] = schedule_tick()
        assert not requests, [r.tags for r in requests][:3]

        for plate in entities[:MATERIALIZATIONS]:
            instance.report_runless_asset_event(
                AssetMaterialization(segmentation_masks.key, partition=partition_key(plate))
            )

        def measurement_tick(cursor):
            context = build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources)
            return timed(lambda: segmented_directory_sensor(context))

        result, figures["measure_sensor_s"] = measurement_tick(None)
        assert len(result.run_requests) == min(MATERIALIZATIONS, len(entities))
        _, figures["measure_sensor_idle_s"] = measurement_tick(result.cursor)

        figures["cli_entities_s"] = cli("entities", "--json")
        figures["cli_show_s"] = cli("show", shown.entity_id)
        _, seconds = timed(lambda: (store.descendants(entities[0].entity_id), store.ancestors(shown.entity_id)))
        figures["lineage_ms"] = 1000 * seconds
        figures["graphql_partitions_s"] = partition_tab_seconds(instance)


def partition_tab_seconds(instance) -> float:
    """The UI's Partitions-tab query for segmentation_masks against the code location, in-process."""
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    definitions = str(Path(__file__).resolve().parents[1] / "mantle_assets" / "definitions.py")
    with define_out_of_process_context(definitions, "defs", instance) as context:
        variables = {"assetKey": {"path": ["segmentation_masks"]}}
        execute_dagster_graphql(context, PARTITION_HEALTH_QUERY, variables)  # warms the workspace snapshot
        result, seconds = timed(lambda: execute_dagster_graphql(context, PARTITION_HEALTH_QUERY, variables))
    node = result.data["assetNodeOrError"]
    assert len(node["partitionKeysByDimension"][0]["partitionKeys"]) >= 1, result
    return seconds


class Figures(dict):
    """One N's figures, each printed to stderr (and all written to ``path``) as soon as it is measured.

    A long run (N=10,000) leaves what it reached.
    """

    def __init__(self, plates: int, path: Path | None, everything: dict):
        super().__init__()
        self.plates, self.path, self.everything = plates, path, everything

    def __setitem__(self, key: str, value: float) -> None:
        super().__setitem__(key, value)
        print(f"N={self.plates}: {COLUMNS[key]} = {value:.3g}", file=sys.stderr, flush=True)
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.write_text(json.dumps(self.everything, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plates", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--one-by-one", type=int, default=100, help="Plates registered one by one (default 100).")
    parser.add_argument("--json", type=Path, help="Also write the figures here, after each N.")
    parser.add_argument("--quick", action="store_true",
                        help="Stop after the all-stale schedule tick: no masks, observation run, CLI or UI figures.")
    arguments = parser.parse_args()
    arguments.work = arguments.work.resolve()
    results: dict[int, dict[str, float]] = {}
    print("| " + " | ".join(["N", *COLUMNS.values()]) + " |")
    print("|" + "---|" * (len(COLUMNS) + 1))
    for plates in arguments.plates:
        results[plates] = Figures(plates, arguments.json, results)
        measure(plates, arguments.work, arguments.one_by_one, results[plates], arguments.quick)
        cells = [f"{plates:,}", *(f"{results[plates][key]:.3g}" if key in results[plates] else "-" for key in COLUMNS)]
        print("| " + " | ".join(cells) + " |", flush=True)
    if len(results) > 1:
        low, high = min(results), max(results)
        print(f"\nGrowth per plate from N={low:,} to N={high:,} (ms per plate; registration: change of ms/plate):")
        for key, label in COLUMNS.items():
            if key not in results[high]:
                continue
            slope = (results[high][key] - results[low][key]) / (high - low)
            factor = 1 if key.endswith("_ms") or key.endswith("_per_plate") else 1000
            print(f"  {label}: {factor * slope:.4f}")


if __name__ == "__main__":
    main()
