"""Asset jobs."""

from dagster import define_asset_job

from mantle_assets.orchestration.partitions import image_directory_partitions

segmentation_job = define_asset_job(
    "segmentation_job",
    selection=["segmentation_masks"],
    partitions_def=image_directory_partitions,
    description="Segment one registered image directory (partition) with Cellpose.",
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
