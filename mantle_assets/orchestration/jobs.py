"""Asset jobs."""

from dagster import define_asset_job

from mantle_assets.orchestration.cells import CellConfig
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.orchestration.partitions import image_directory_partitions


def segmentation_run_config(config: SegmentationConfig) -> dict:
    return {"ops": {"segmentation_masks": {"config": config.model_dump()}}}


def cell_run_config(config: CellConfig) -> dict:
    return {"ops": {"cell_masks": {"config": config.model_dump()}}}


segmentation_job = define_asset_job(
    "segmentation_job",
    selection=["segmentation_masks"],
    partitions_def=image_directory_partitions,
    description="Segment registered image directories (partitions) with Cellpose. A parameter left "
    "unset (null) takes each directory's experiment defaults (`mantle defaults`), else the platform's.",
)

cell_job = define_asset_job(
    "cell_job",
    selection=["cell_masks"],
    partitions_def=image_directory_partitions,
    description="Grow whole cells around the current nuclei masks of image directories (partitions); "
    "method propagate (default, offline) or cellpose (a whole-cell model such as cyto3).",
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
