"""Training as an asset: a couple of epochs on small crops, recorded with its metrics."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from dagster import DagsterInstance

from mantle_assets.definitions import defs
from mantle_assets.demo import default_data_candidates
from mantle_assets.entities import EntityStore
from mantle_assets.imaging.precision import resolve_precision
from mantle_assets_tests.conftest import missing_data

pytestmark = pytest.mark.slow


def nuclei_gt() -> Path:
    for candidate in default_data_candidates():
        annotated = candidate.parent / "nuclei_gt"
        if annotated.is_dir():
            return annotated
    missing_data("annotated nuclei (shared/data/nuclei_gt) not found")


def cropped_set(source: Path, target: Path, count: int) -> Path:
    for folder in ("images", "masks"):
        (target / folder).mkdir(parents=True)
    for image in sorted((source / "images").glob("*.tif"))[:count]:
        for folder in ("images", "masks"):
            pixels = tifffile.imread(source / folder / image.name)
            tifffile.imwrite(target / folder / image.name, np.ascontiguousarray(pixels[:256, :256]))
    return target


def test_training_registers_a_model_entity_with_metrics(tmp_path, mantle_home):
    annotated = nuclei_gt()
    train = cropped_set(annotated / "bbbc039_train", tmp_path / "train crops", 4)
    val = cropped_set(annotated / "bbbc039_val", tmp_path / "val crops", 2)
    config = {
        "train_directories": [f"crops={train}"],
        "validation_directory": str(val),
        "model_name": "tiny",
        "n_epochs": 2,
        "nimg_per_epoch": 8,
        "size_epochs": 1,
        "size_nimg_per_epoch": 8,
        "size_crop_size": 256,
    }
    with DagsterInstance.local_temp(str(mantle_home / "dagster")) as instance:
        result = defs.resolve_job_def("training_job").execute_in_process(
            run_config={"ops": {"trained_cellpose_model": {"config": config}}}, instance=instance
        )
    store = EntityStore()
    (model,) = store.list("cellpose_model")
    props = model.properties
    assert Path(props["model_file"]).is_file()
    assert Path(props["model_file"] + "_size.npy").is_file()
    assert props["epochs"] == 2 and props["seed"] == 0
    assert props["hyperparameters"]["nimg_per_epoch"] == 8
    assert props["diam_mean"] == 17.0
    assert props["precision"] == resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    assert 10 < props["diam_labels"] < 60
    assert set(props["validation_ap"]) >= {"ap50", "ap75", "ap90", "small_object_recall", "n_small_objects",
                                           "diameter_median_relative_error"}
    assert all(0.0 <= props["validation_ap"][k] <= 1.0 for k in ("ap50", "ap75", "ap90"))

    train_entity, val_entity = store.list("annotated_image_directory")
    assert props["training_entities"] == [train_entity.entity_id]
    assert props["validation_entity"] == val_entity.entity_id
    assert train_entity.properties["n_images"] == 4
    (edge,) = store.parents(model.entity_id)
    assert (edge.parent_id, edge.run_id) == (train_entity.entity_id, result.run_id)
    metadata = result.asset_materializations_for_node("trained_cellpose_model")[0].metadata
    assert metadata["model_entity"].value == model.entity_id
    assert metadata["small_object_recall"].value == {
        "recall": props["validation_ap"]["small_object_recall"], "objects": props["validation_ap"]["n_small_objects"]}
