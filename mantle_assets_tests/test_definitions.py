import json
import subprocess
import sys

from dagster import AssetKey, Definitions, DynamicPartitionsDefinition

from mantle_assets.definitions import defs


def test_definitions_load_and_validate():
    Definitions.validate_loadable(defs)
    for job in ("segmentation_job", "training_job", "observe_image_directories_job"):
        assert defs.resolve_job_def(job) is not None


def test_masks_are_partitioned_by_image_directory_entity():
    masks = defs.get_assets_def(AssetKey("segmentation_masks"))
    assert isinstance(masks.partitions_def, DynamicPartitionsDefinition)
    assert masks.partitions_def.name == "image_directory"
    assert AssetKey("image_directory") in masks.dependency_keys


def test_segmentation_step_is_gpu_work():
    masks = defs.get_assets_def(AssetKey("segmentation_masks"))
    tags = masks.op.tags
    assert tags["mantle/gpu"] == "true"
    # Dagster stores dict-valued tags as JSON text, which dagster-k8s parses back.
    k8s = json.loads(tags["dagster-k8s/config"])
    assert k8s["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert masks.op.pool == "gpu"


def test_importing_the_code_location_does_no_work(tmp_path):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    # Every defs module is imported when the UI loads: no database, no model, no torch.
    code = (
        "import sys, mantle_assets.definitions; "
        "print(int('torch' in sys.modules), int('cellpose' in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, check=True
    ).stdout.split()
    assert output == ["0", "0"]
    assert list(workdir.iterdir()) == []


def test_measurements_and_readout_follow_the_masks_per_partition():
    measured = defs.get_assets_def(AssetKey("cell_measurements"))
    readout = defs.get_assets_def(AssetKey("assay_readout"))
    assert measured.partitions_def.name == readout.partitions_def.name == "image_directory"
    assert AssetKey("segmentation_masks") in measured.dependency_keys
    assert AssetKey("cell_measurements") in readout.dependency_keys
    job = defs.resolve_job_def("measurement_job")
    assert {check.name for check in job.asset_layer.asset_graph.asset_check_keys} == {
        "fields_have_objects", "ratios_within_physical_bounds", "wells_have_enough_cells"}
