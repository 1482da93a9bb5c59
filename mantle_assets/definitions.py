"""The code location: the one ``Definitions`` object ``workspace.yaml`` loads."""

from dagster import Definitions

from mantle_assets.orchestration.assets import image_directory, segmentation_masks
from mantle_assets.orchestration.cells import cell_masks
from mantle_assets.orchestration.concurrency import mantle_executor
from mantle_assets.orchestration.jobs import (
    cell_job,
    measurement_job,
    observe_image_directories_job,
    segmentation_job,
    training_job,
)
from mantle_assets.orchestration.measurements import assay_readout, cell_measurements, measurement_checks
from mantle_assets.orchestration.recovery import ended_run_cleanup_sensor
from mantle_assets.orchestration.registration_jobs import register_image_directory_job, set_segmentation_defaults_job
from mantle_assets.orchestration.resources import CellposeResource, EntityStoreResource, InboxResource
from mantle_assets.orchestration.schedules import (
    image_directory_observation_schedule,
    stale_cell_schedule,
    stale_segmentation_schedule,
)
from mantle_assets.orchestration.sensors import (
    inbox_sensor,
    new_image_directory_sensor,
    segmented_directory_sensor,
    segmented_nuclei_cell_sensor,
)
from mantle_assets.orchestration.training import trained_cellpose_model

defs = Definitions(
    assets=[image_directory, segmentation_masks, cell_masks, trained_cellpose_model, cell_measurements, assay_readout],
    asset_checks=measurement_checks,
    jobs=[
        segmentation_job,
        cell_job,
        training_job,
        observe_image_directories_job,
        measurement_job,
        register_image_directory_job,
        set_segmentation_defaults_job,
    ],
    sensors=[
        new_image_directory_sensor,
        inbox_sensor,
        segmented_directory_sensor,
        segmented_nuclei_cell_sensor,
        ended_run_cleanup_sensor,
    ],
    schedules=[stale_segmentation_schedule, stale_cell_schedule, image_directory_observation_schedule],
    executor=mantle_executor,
    resources={
        "entity_store": EntityStoreResource(),
        "cellpose": CellposeResource(),
        "inbox": InboxResource(),
    },
)
