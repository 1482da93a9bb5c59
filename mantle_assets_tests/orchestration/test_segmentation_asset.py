"""The segmentation asset end to end: real entity store, real Dagster instance, real Cellpose."""

import numpy as np
import pytest
import tifffile
from dagster import AssetKey
from PIL import Image
from skimage.segmentation import find_boundaries

from mantle_assets.cli import root_cause
from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.imaging.preview import LABEL_HEIGHT, TILE_GAP
from mantle_assets.imaging.segmentation import SegmentationSettings
from mantle_assets.models.registry import resolve_model
from mantle_assets.orchestration.assets import current_masks
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.resources import CellposeResource
from mantle_assets.registration import register_image_directory
from mantle_assets_tests.conftest import CROP, bbbc014_images, missing_data

pytestmark = pytest.mark.slow


@pytest.fixture
def registered(bbbc014_crops, instance):
    entity = register_image_directory(EntityStore(), bbbc014_crops, "crops")
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])
    return entity


def contact_sheet_of(path: str) -> np.ndarray:
    """The PNG file of a preview, decoded."""
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def run_segmentation(instance, entity_id, **config):
    return defs.resolve_job_def("segmentation_job").execute_in_process(
        run_config={"ops": {"segmentation_masks": {"config": config}}},
        instance=instance,
        partition_key=entity_id,
        raise_on_error=False,
    )


def dna_nuclei(bundled_model_name, diameter="None"):
    return dict(cellpose_model=bundled_model_name, nuclei_channel=2, cytoplasm_channel=2, diameter=diameter)


def test_materialisation_records_masks_entity_and_lineage(registered, instance, bundled_model_name, mantle_home):
    result = run_segmentation(instance, registered.entity_id, **dna_nuclei(bundled_model_name))
    assert result.success
    metadata = result.asset_materializations_for_node("segmentation_masks")[0].metadata

    store = EntityStore()
    output = store.get(metadata["output_entity"].value)
    assert output.data_type == "segmentation_mask_directory"
    props = output.properties
    assert props["source_entity"] == registered.entity_id
    assert (props["cellpose_model"], props["nuclei_channel"], props["cytoplasm_channel"], props["diameter"]) == (
        bundled_model_name, 2, 2, "None")
    assert props["run_id"] == result.run_id
    assert 5 < props["estimated_diameter"] < 30  # BBBC014 nuclei are ~10-14 px across

    masks = sorted((mantle_home / "masks" / registered.entity_id / result.run_id).iterdir())
    assert [m.name for m in masks] == ["01-A-01_cp_masks.tif", "12-A-12_cp_masks.tif"]
    counts = {}
    for path in masks:
        labels = tifffile.imread(path)
        assert labels.dtype == np.uint16 and labels.shape == (160, 160)
        counts[path.name.removesuffix("_cp_masks.tif")] = int(labels.max())
        assert len(np.unique(labels)) - 1 == labels.max()  # labels are consecutive
    assert props["cells_per_field"] == counts
    assert props["total_cells"] == sum(counts.values())
    assert all(count >= 10 for count in counts.values())  # a 160 px crop holds dozens of nuclei

    (edge,) = store.parents(output.entity_id)
    assert (edge.parent_id, edge.pipeline) == (registered.entity_id, "cellpose-segmentation")
    assert edge.run_id == result.run_id
    assert edge.parameters["cellpose_model"] == bundled_model_name

    assert metadata["input_entity"].value == registered.entity_id
    assert metadata["total_cells"].value == props["total_cells"]
    # A link to the sheet, short enough for Dagster to render in place (under 1,000 characters).
    preview_file = mantle_home / "previews" / registered.entity_id / f"{result.run_id}.png"
    assert metadata["preview_file"].value == str(preview_file)
    assert metadata["preview"].value == (
        "Outlines on fields: all 2; each tile: well, field, objects\n\n"
        f"![preview](/mantle/previews/{registered.entity_id}/{result.run_id}.png)")
    assert [path.name for path in (mantle_home / "previews").rglob("*")] == [registered.entity_id, preview_file.name]
    assert metadata["input_properties"].value["field_grouping"]["n_fields"] == 2
    (lineage_row,) = metadata["output_lineage"].value.records
    assert (lineage_row.data["relation"], lineage_row.data["entity"]) == ("parent", registered.entity_id)
    assert metadata["cells_per_field"].value == {
        "min": min(counts.values()), "median": float(np.median(list(counts.values()))), "max": max(counts.values())}

    # The counts per field, each with its well, median object area and mask file, as in the masks entity.
    rows = [record.data for record in metadata["objects_per_field"].value.records]
    assert [(r["field"], r["well"], r["mask_file"]) for r in rows] == [
        ("01-A-01", "A01", "01-A-01_cp_masks.tif"), ("12-A-12", "A12", "12-A-12_cp_masks.tif")]
    assert {r["field"]: r["objects"] for r in rows} == props["cells_per_field"]
    for row, path in zip(rows, masks, strict=True):
        areas = np.bincount(tifffile.imread(path).ravel())[1:]
        assert row["median_area_px"] == round(float(np.median(areas)), 1)
    assert metadata["output_path"].value == str(mantle_home / "masks" / registered.entity_id / result.run_id)
    assert metadata["diameter_px"].value == round(metadata["diameter_px"].value, 1)

    # The contact sheet: both fields, side by side under their labels, outlined where the masks' objects end.
    sheet = contact_sheet_of(metadata["preview_file"].value)
    assert sheet.shape == (LABEL_HEIGHT + 160, 2 * 160 + TILE_GAP, 3)  # 160 px crops are shown unshrunk
    for column, path in enumerate(masks):
        tile = sheet[LABEL_HEIGHT:, column * (160 + TILE_GAP) :][:, :160].astype(int)
        outlined = (tile[..., 0] - tile[..., 1]) > 100
        assert np.array_equal(outlined, find_boundaries(tifffile.imread(path), mode="inner"))


def test_rematerialising_versions_the_output_without_duplicates(registered, instance, bundled_model_name, mantle_home):
    first = run_segmentation(instance, registered.entity_id, **dna_nuclei(bundled_model_name, "12"))
    second = run_segmentation(instance, registered.entity_id, **dna_nuclei(bundled_model_name, "14"))
    assert first.success and second.success
    store = EntityStore()
    (output,) = store.list("segmentation_mask_directory")
    assert output.version == 2
    assert output.properties["run_id"] == second.run_id
    assert {e.run_id for e in store.parents(output.entity_id)} == {first.run_id, second.run_id}
    assert len(store.parents(output.entity_id)) == 2
    changed = {c.property for c in store.history(output.entity_id) if c.run_id == second.run_id}
    assert {"diameter", "mask_directory", "run_id"} <= changed
    run_dirs = sorted(p.name for p in (mantle_home / "masks" / registered.entity_id).iterdir())
    assert run_dirs == sorted([first.run_id, second.run_id])  # neither run overwrote the other


def test_bad_channel_fails_the_run_and_records_nothing(registered, instance, bundled_model_name, mantle_home):
    result = run_segmentation(
        instance, registered.entity_id, cellpose_model=bundled_model_name, nuclei_channel=3, cytoplasm_channel=3)
    assert not result.success
    failure = result.failure_data_for_node("segmentation_masks")
    assert root_cause(failure).endswith("nuclei_channel=3 but the images have 2 channel(s)")
    assert EntityStore().list("segmentation_mask_directory") == []
    assert not (mantle_home / "masks").exists() or not any((mantle_home / "masks").rglob("*.tif"))


def test_observation_versions_change_with_the_directory(registered, instance, bbbc014_crops):
    def observed_version():
        assert defs.resolve_job_def("observe_image_directories_job").execute_in_process(instance=instance).success
        (record,) = instance.fetch_observations(AssetKey("image_directory"), limit=1).records
        assert record.partition_key == registered.entity_id
        return record.asset_observation.data_version

    before = observed_version()
    assert before.startswith("4 files, sha256 ")
    tifffile.imwrite(bbbc014_crops / "Channel1-13-B-01.tif", np.zeros((160, 160), np.uint8))
    tifffile.imwrite(bbbc014_crops / "Channel2-13-B-01.tif", np.zeros((160, 160), np.uint8))
    after = observed_version()
    assert after.startswith("6 files, ") and after != before


def test_masks_without_objects_fail_the_run_and_stay_unrecorded(registered, instance, bundled_model_name,
                                                                 bbbc014_crops, mantle_home):
    first = run_segmentation(instance, registered.entity_id, **dna_nuclei(bundled_model_name))
    assert first.success
    store = EntityStore()
    before = current_masks(store, registered.entity_id)
    # The plate's images replaced by blank ones (a failed acquisition): Cellpose finds nothing in any field.
    for image in bbbc014_crops.iterdir():
        tifffile.imwrite(image, np.zeros((160, 160), np.uint8))

    blank = run_segmentation(instance, registered.entity_id, **dna_nuclei(bundled_model_name))

    assert not blank.success
    assert root_cause(blank.failure_data_for_node("segmentation_masks")).endswith(
        f"0 objects in all 2 fields with {bundled_model_name} (nuclei_channel=2, cytoplasm_channel=2, "
        "diameter=None): check the channel and diameter")
    assert blank.asset_materializations_for_node("segmentation_masks") == []
    store = EntityStore()
    assert current_masks(store, registered.entity_id) == before  # the earlier masks stay current, unchanged
    assert [e.run_id for e in store.parents(before.entity_id)] == [first.run_id]
    assert sorted(p.name for p in (mantle_home / "masks" / registered.entity_id).iterdir()) == [first.run_id]


def test_a_field_of_five_channels_is_segmented_on_its_fifth(tmp_path, instance, bundled_model_name, mantle_home):
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found")
    nfkb, dna = (tifffile.imread(images / f"Channel{c}-01-A-01.tif")[CROP] for c in (1, 2))
    noise = np.random.default_rng(0).integers(0, 255, (3, *dna.shape)).astype(dna.dtype)
    directory = tmp_path / "cell painting"
    directory.mkdir()
    # Channel 5 holds the nuclei; the others hold other content, so any other choice gives other masks.
    tifffile.imwrite(directory / "01-A-01.tif", np.stack([nfkb, *noise, dna]))
    entity = register_image_directory(EntityStore(), directory, "cell painting")
    assert entity.properties["field_grouping"]["n_channels"] == 5
    instance.add_dynamic_partitions(image_directory_partitions.name, [entity.entity_id])

    result = run_segmentation(instance, entity.entity_id, cellpose_model=bundled_model_name, nuclei_channel=5,
                              cytoplasm_channel=5, diameter="12")

    assert result.success
    output = current_masks(EntityStore(), entity.entity_id)
    assert (output.properties["nuclei_channel"], output.properties["cytoplasm_channel"]) == (5, 5)
    masks = tifffile.imread(mantle_home / "masks" / entity.entity_id / result.run_id / "01-A-01_cp_masks.tif")
    segmenter = CellposeResource().segmenter(resolve_model(bundled_model_name))
    alone = segmenter.segment(dna.astype(np.float32), SegmentationSettings(diameter=12.0)).masks
    assert masks.max() >= 10 and np.array_equal(masks, alone)  # the nuclei of channel 5 and nothing else
