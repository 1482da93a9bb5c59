"""Cells in the automation (issue 16, item 5): new nuclei masks -> cells -> measurements, and the nightly
schedule of stale cells; on a real Dagster instance and entity store, the requested runs executed for real."""

from datetime import UTC, datetime

import pytest
from dagster import AssetKey, AssetMaterialization, build_schedule_context, build_sensor_context

from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import MASK_DIRECTORY, current_masks
from mantle_assets.orchestration.cells import CELL_PIPELINE, CellConfig, current_cell_masks
from mantle_assets.orchestration.instance import automatic_run_tags
from mantle_assets.orchestration.measurements import MEASUREMENT_TABLE, current_measurements_of
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.registration_jobs import update_segmentation_defaults
from mantle_assets.orchestration.schedules import stale_cell_schedule
from mantle_assets.orchestration.sensors import segmented_directory_sensor, segmented_nuclei_cell_sensor
from mantle_assets_tests.orchestration.test_cell_masks import otsu_nuclei, plate, register, run_job  # noqa: F401
from mantle_assets_tests.orchestration.test_measurement_sensor import measured, segmented
from mantle_assets_tests.orchestration.test_schedules import plates, record_current_masks  # noqa: F401
from mantle_assets_tests.orchestration.test_sensors import add_plates, statements_of, store_statements  # noqa: F401


def asks_for_cells(entity, method="propagate"):
    (updated, _), = update_segmentation_defaults(EntityStore(), {"cell_method": method}, entity_id=entity.entity_id)
    return updated


def cells_grown(entity, tmp_path, method="propagate", run_id=None):
    """Cell masks of the entity's current nuclei, as cell_masks records them, and their materialization."""
    nuclei = current_masks(EntityStore(), entity.entity_id)
    run_id = run_id or f"cells-{entity.entity_id}"
    folder = tmp_path / "cells" / run_id
    folder.mkdir(parents=True)
    parameters = CellConfig(method=method).parameters()
    EntityStore().record_output(
        MASK_DIRECTORY, f"{entity.name} cells",
        {"mask_directory": str(folder), "source_entity": entity.entity_id, "objects": "cells", "method": method,
         **{name: nuclei.properties[name] for name in ("cellpose_model", "nuclei_channel", "cytoplasm_channel",
                                                        "diameter")},
         "nuclei_mask_entity": nuclei.entity_id, "nuclei_run_id": nuclei.properties["run_id"],
         "cell_parameters": parameters, "run_id": run_id},
        parents=[nuclei.entity_id, entity.entity_id], pipeline=CELL_PIPELINE, run_id=run_id, parameters=parameters,
    )


def materialized(instance, asset: str, entity) -> None:
    instance.report_runless_asset_event(AssetMaterialization(asset, partition=entity.entity_id))


def cell_tick(instance, cursor=None):
    with build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as context:
        return segmented_nuclei_cell_sensor(context)


def measurement_tick(instance, cursor=None):
    with build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as context:
        return segmented_directory_sensor(context)


def stale_cells(instance) -> dict[str, str]:
    with build_schedule_context(
        instance=instance, scheduled_execution_time=datetime(2026, 11, 27, 2, 30, tzinfo=UTC), resources=defs.resources
    ) as context:
        return {request.partition_key: request.tags["mantle/stale_reason"] for request in stale_cell_schedule(context)}


def test_new_nuclei_of_a_plate_that_asks_for_cells_get_one_automatic_cell_run(instance, plates, tmp_path):  # noqa: F811
    asks_for_cells(plates[0])
    asks_for_cells(plates[1], "cellpose")
    for entity in plates:
        segmented(instance, entity, tmp_path)
    first = cell_tick(instance)
    # plates[2] asks for no cells: nuclei alone.
    assert [r.partition_key for r in first.run_requests] == [plates[0].entity_id, plates[1].entity_id]
    assert [r.run_config["ops"]["cell_masks"]["config"]["method"] for r in first.run_requests] == [
        "propagate", "cellpose"]
    assert all(r.tags == automatic_run_tags() for r in first.run_requests)
    assert not cell_tick(instance, first.cursor).run_requests


def test_nuclei_whose_cells_are_grown_from_them_get_no_cell_run(instance, plates, tmp_path):  # noqa: F811
    asks_for_cells(plates[0])
    segmented(instance, plates[0], tmp_path)
    cells_grown(plates[0], tmp_path)
    assert cell_tick(instance).run_requests == []
    # Segmented again: the cells were grown from the old nuclei.
    segmented(instance, plates[0], tmp_path / "again", run_id="again")
    (request,) = cell_tick(instance).run_requests
    assert request.partition_key == plates[0].entity_id


def test_a_plate_that_asks_for_cells_is_measured_on_its_cells_not_its_nuclei(instance, plates, tmp_path):  # noqa: F811
    asks_for_cells(plates[0])
    segmented(instance, plates[0], tmp_path)
    segmented(instance, plates[1], tmp_path)
    on_nuclei = measurement_tick(instance)
    assert [r.partition_key for r in on_nuclei.run_requests] == [plates[1].entity_id]
    cells_grown(plates[0], tmp_path)
    materialized(instance, "cell_masks", plates[0])
    (on_cells,) = measurement_tick(instance, on_nuclei.cursor).run_requests
    assert on_cells.partition_key == plates[0].entity_id and on_cells.tags == automatic_run_tags()


def test_measurements_made_before_the_cells_are_made_again_when_they_appear(instance, plates, tmp_path):  # noqa: F811
    segmented(instance, plates[0], tmp_path)
    measured(plates[0], tmp_path)  # cytoplasm: ring
    cursor = measurement_tick(instance).cursor
    cells_grown(plates[0], tmp_path)
    materialized(instance, "cell_masks", plates[0])
    (request,) = measurement_tick(instance, cursor).run_requests
    assert request.partition_key == plates[0].entity_id


def test_a_cursor_written_before_the_cells_carries_on_for_both(instance, plates, tmp_path):  # noqa: F811
    segmented(instance, plates[0], tmp_path)
    measured(plates[0], tmp_path)
    # The one-asset sensor's cursor: the storage id of the last nuclei materialization it read.
    old = str(instance.fetch_materializations(AssetKey("segmentation_masks"), limit=1).records[0].storage_id)
    cells_grown(plates[0], tmp_path)
    materialized(instance, "cell_masks", plates[0])
    (request,) = measurement_tick(instance, old).run_requests
    assert request.partition_key == plates[0].entity_id


def test_the_nightly_schedule_says_why_cells_are_stale(instance, plates, tmp_path):  # noqa: F811
    for entity in plates:
        record_current_masks(entity, tmp_path)
    asks_for_cells(plates[0])
    asks_for_cells(plates[1])
    assert stale_cells(instance) == {plates[0].entity_id: "no cells", plates[1].entity_id: "no cells"}
    cells_grown(plates[0], tmp_path)
    cells_grown(plates[1], tmp_path)
    assert stale_cells(instance) == {}
    asks_for_cells(plates[1], "cellpose")
    assert stale_cells(instance) == {plates[1].entity_id: "cell parameters changed"}
    record_current_masks(plates[0], tmp_path / "again", run_id="segmented again")
    assert stale_cells(instance) == {
        plates[0].entity_id: "nuclei segmented again", plates[1].entity_id: "cell parameters changed"}


def test_a_failed_cell_run_is_listed(instance, plates, tmp_path):  # noqa: F811
    for entity in plates:
        record_current_masks(entity, tmp_path)
        cells_grown(asks_for_cells(entity), tmp_path)
    # One-channel plates: the cells' run cannot find a cytoplasm channel and fails.
    failed = run_job(instance, "cell_job", plates[2].entity_id)
    assert not failed.success
    assert stale_cells(instance) == {plates[2].entity_id: "last run failed"}


def test_the_schedule_and_the_cell_sensor_send_as_many_store_statements_for_200_plates_as_for_10(
    instance, plates, tmp_path, store_statements  # noqa: F811
):
    model = asks_for_cells(plates[0])
    sent = {}
    for count in (10, 200):
        added = add_plates(model, count - len(EntityStore().entity_ids("image_directory")))
        instance.add_dynamic_partitions(image_directory_partitions.name, [e.entity_id for e in added])
        record_current_masks(added[-1], tmp_path)
        materialized(instance, "segmentation_masks", added[-1])
        stale, schedule = statements_of(store_statements, lambda: stale_cells(instance))  # noqa: B023
        requested, sensor = statements_of(store_statements, lambda: cell_tick(instance))  # noqa: B023
        sent[count] = (schedule, sensor)
        assert added[-1].entity_id in stale and added[-1].entity_id in [r.partition_key for r in requested.run_requests]
    assert sent[10] == sent[200]


@pytest.mark.slow
def test_nuclei_then_cells_then_measurements_with_the_cells(plate, instance, tmp_path):  # noqa: F811
    plate = asks_for_cells(plate)
    nuclei = otsu_nuclei(plate, tmp_path / "nuclei", "otsu")
    materialized(instance, "segmentation_masks", plate)
    assert measurement_tick(instance).run_requests == []  # the cells go first

    (cell_request,) = cell_tick(instance).run_requests
    grown = defs.resolve_job_def("cell_job").execute_in_process(
        instance=instance, partition_key=cell_request.partition_key, run_config=cell_request.run_config,
        tags=cell_request.tags,
    )
    assert grown.success
    cells = current_cell_masks(EntityStore(), plate.entity_id)
    assert cells.properties["nuclei_mask_entity"] == nuclei.entity_id and cells.properties["total_cells"] > 0

    (measure_request,) = measurement_tick(instance).run_requests
    measurement = defs.resolve_job_def("measurement_job").execute_in_process(
        instance=instance, partition_key=measure_request.partition_key, run_config=measure_request.run_config
    )
    assert measurement.success
    table = current_measurements_of(EntityStore(), plate.entity_id)
    assert table.properties["cytoplasm"] == "cell" and table.properties["cell_mask_entity"] == cells.entity_id
    assert len(EntityStore().list(MEASUREMENT_TABLE)) == 1  # measured once, on the cells
    # Nothing left to do: no tick from the start asks again, and the cells are current for the nightly schedule.
    assert not cell_tick(instance).run_requests and not measurement_tick(instance).run_requests
    assert stale_cells(instance) == {}


def test_a_cell_method_that_is_none_of_them_is_refused_in_one_line(plates):  # noqa: F811
    with pytest.raises(ValueError, match=r"^cell_method must be one of propagate, cellpose, none, got 'grow'$"):
        asks_for_cells(plates[0], "grow")
    assert "cell_method" not in (EntityStore().get(plates[0].entity_id).properties.get("segmentation_defaults") or {})
