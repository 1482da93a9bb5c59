"""Asset jobs."""

from dagster import PartitionedConfig, define_asset_job

from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.partitions import image_directory_partitions


def segmentation_run_config(config: SegmentationConfig) -> dict:
    return {"ops": {"segmentation_masks": {"config": config.model_dump()}}}


def experiment_defaults_run_config(partition_key: str) -> dict:
    """A partition's run config: its image directory's segmentation defaults over the platform's.

    What the launchpad shows for the partition, and what a backfill of the job runs with.
    """
    return segmentation_run_config(SegmentationConfig().resolved_for(EntityStore().get(partition_key)))


segmentation_job = define_asset_job(
    "segmentation_job",
    selection=["segmentation_masks"],
    partitions_def=image_directory_partitions,
    config=PartitionedConfig(
        partitions_def=image_directory_partitions,
        run_config_for_partition_key_fn=experiment_defaults_run_config,
    ),
    description="Segment one registered image directory (partition) with Cellpose, by default with the "
    "experiment's segmentation defaults (`mantle defaults`).",
)

measurement_job = define_asset_job(
    "measurement_job",
    selection=["cell_measurements", "assay_readout"],
    partitions_def=image_directory_partitions,
    description="Measure every segmented object of one image directory (partition) and read out its plate.",
)

training_job = define_asset_job(
    "training_job",
    selection=["trained_cellpose_model"],
    description="Train and validate a Cellpose model from annotated directories.",
)

observe_image_directories_job = define_asset_job(
    "observe_image_directories_job",
    selection=["image_directory"],
    description="Record each registered directory's file count and fingerprint (its data version).",
)
