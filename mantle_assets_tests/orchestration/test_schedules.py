"""The nightly stale-masks schedule evaluated on a real instance and entity store."""

import shutil
from datetime import UTC, datetime

import numpy as np
import pytest
import tifffile
from dagster import build_schedule_context

from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.models.registry import resolve_model
from mantle_assets.orchestration import schedules as schedules_module
from mantle_assets.orchestration.assets import MASK_DIRECTORY, SEGMENTATION_PIPELINE
from mantle_assets.orchestration.partitions import image_directory_partitions
from mantle_assets.orchestration.schedules import batches, stale_segmentation_schedule
from mantle_assets.orchestration.sensors import default_segmentation_config
from mantle_assets.registration import directory_fingerprint, register_image_directory
from mantle_assets_tests.orchestration.test_sensors import add_plates, statements_of, store_statements  # noqa: F401


@pytest.fixture
def plates(tmp_path, instance):
    """Three registered one-field plates: two in experiment A, one in B."""
    store = EntityStore()
    entities = []
    for name, experiment in (("a1", "A"), ("a2", "A"), ("b1", "B")):
        directory = tmp_path / name
        directory.mkdir()
        tifffile.imwrite(directory / "field.tif", np.zeros((8, 8), np.uint8))
        entities.append(register_image_directory(store, directory, experiment))
    instance.add_dynamic_partitions(image_directory_partitions.name, [e.entity_id for e in entities])
    return entities


def record_current_masks(entity, tmp_path, run_id=None):
    """What a successful segmentation (run ``run_id``) with the entity's defaults records."""
    run_id = run_id or f"run-{entity.entity_id}"
    config = default_segmentation_config(entity)
    masks = tmp_path / "masks" / entity.entity_id
    masks.mkdir(parents=True)
    EntityStore().record_output(
        MASK_DIRECTORY,
        f"{entity.name} masks",
        {
            "mask_directory": str(masks),
            "source_entity": entity.entity_id,
            **config.parameters(),
            "extra_parameters": {k: getattr(config, k) for k in ("flow_threshold", "cellprob_threshold", "min_size")},
            "source_fingerprint": directory_fingerprint(entity.properties["image_directory"])[1],
            "model_sha256": resolve_model(config.cellpose_model).weights_sha256(),
            "run_id": run_id,
        },
        parents=[entity.entity_id],
        pipeline=SEGMENTATION_PIPELINE,
        run_id=run_id,
        parameters=config.parameters(),
    )


def requests(instance):
    with build_schedule_context(
        instance=instance, scheduled_execution_time=datetime(2026, 11, 27, 2, tzinfo=UTC), resources=defs.resources
    ) as context:
        return stale_segmentation_schedule(context)


def requested_partitions(instance, request) -> list[str]:
    if request.partition_key is not None:
        return [request.partition_key]
    keys = image_directory_partitions.get_partition_keys(dynamic_partitions_store=instance)
    first, last = request.partition_key_range
    return keys[keys.index(first) : keys.index(last) + 1]


def preview(instance):
    """Each requested partition and why."""
    return {
        key: request.tags["mantle/stale_reason"]
        for request in requests(instance)
        for key in requested_partitions(instance, request)
    }


def test_missing_masks_are_listed(instance, plates):
    assert preview(instance) == {e.entity_id: "no masks" for e in plates}


def test_current_masks_are_not(instance, plates, tmp_path):
    for entity in plates:
        record_current_masks(entity, tmp_path)
    assert preview(instance) == {}


def test_changing_an_experiments_parameters_lists_exactly_its_partitions(instance, plates, tmp_path):
    for entity in plates:
        record_current_masks(entity, tmp_path)
    store = EntityStore()
    for entity in plates:
        if entity.properties["experiment_name"] == "A":
            store.update(entity.entity_id, {"segmentation_defaults": {"nuclei_channel": 1, "cytoplasm_channel": 1}})
    assert preview(instance) == {plates[0].entity_id: "parameters changed", plates[1].entity_id: "parameters changed"}


def test_a_changed_directory_is_listed(instance, plates, tmp_path):
    for entity in plates:
        record_current_masks(entity, tmp_path)
    tifffile.imwrite(tmp_path / "b1" / "second field.tif", np.zeros((8, 8), np.uint8))
    assert preview(instance) == {plates[2].entity_id: "images changed"}


def test_a_failed_last_run_is_listed(instance, plates, tmp_path):
    for entity in plates:
        record_current_masks(entity, tmp_path)
    failed = defs.resolve_job_def("segmentation_job").execute_in_process(
        run_config={"ops": {"segmentation_masks": {"config": {"nuclei_channel": 3, "cytoplasm_channel": 3}}}},
        instance=instance, partition_key=plates[1].entity_id, raise_on_error=False,
    )
    assert not failed.success
    assert preview(instance) == {plates[1].entity_id: "last run failed"}


def test_changed_model_weights_are_listed(instance, plates, tmp_path):
    weights = tmp_path / "lab model"
    weights.write_bytes(resolve_model(default_segmentation_config(plates[0]).cellpose_model).path.read_bytes())
    store = EntityStore()
    for entity in plates:
        entity = store.update(entity.entity_id, {"segmentation_defaults": {"cellpose_model": str(weights)}})
        record_current_masks(entity, tmp_path)
    assert preview(instance) == {}
    weights.write_bytes(weights.read_bytes() + b"retrained")
    assert set(preview(instance).values()) == {"model changed"}


KEYS = [f"k{i}" for i in range(10)]


def test_a_stretch_of_stale_partitions_is_split_into_near_equal_batches():
    assert batches(dict.fromkeys(KEYS, "no masks"), KEYS, 4) == [
        (["k0", "k1", "k2"], "no masks"), (["k3", "k4", "k5", "k6"], "no masks"), (["k7", "k8", "k9"], "no masks")]


def test_batches_break_at_current_partitions_and_at_another_reason():
    stale = {"k0": "no masks", "k1": "no masks", "k3": "no masks", "k4": "model changed", "k5": "model changed"}
    assert batches(stale, KEYS, 8) == [
        (["k0", "k1"], "no masks"), (["k3"], "no masks"), (["k4", "k5"], "model changed")]


def test_adjacent_stale_partitions_are_requested_as_ranges(instance, plates, monkeypatch):
    monkeypatch.setenv("MANTLE_PLATES_PER_RUN", "2")
    pair, single = requests(instance)
    assert requested_partitions(instance, pair) == [plates[0].entity_id, plates[1].entity_id]
    # A range leaves every parameter to each directory's experiment; one partition spells them out.
    assert set(pair.run_config["ops"]["segmentation_masks"]["config"].values()) == {None}
    assert single.partition_key == plates[2].entity_id
    spelled_out = single.run_config["ops"]["segmentation_masks"]["config"]
    assert spelled_out == default_segmentation_config(plates[2]).model_dump()
    assert len({pair.run_key, single.run_key}) == 2


def test_few_stale_partitions_are_spread_over_the_gpus(instance, plates, monkeypatch):
    assert len(requests(instance)) == 1  # one GPU: the three plates in one run
    monkeypatch.setenv("MANTLE_GPUS", "3")
    assert [requested_partitions(instance, r) for r in requests(instance)] == [[p.entity_id] for p in plates]


def test_a_bad_batch_size_is_named(instance, plates, monkeypatch):
    monkeypatch.setenv("MANTLE_PLATES_PER_RUN", "0")
    with pytest.raises(ValueError, match="MANTLE_PLATES_PER_RUN"):
        requests(instance)


def observe(instance):
    assert defs.resolve_job_def("observe_image_directories_job").execute_in_process(instance=instance).success


@pytest.fixture
def fingerprinted(monkeypatch) -> list:
    """The directories the schedule's tick fingerprints itself."""
    calls: list = []
    real = schedules_module.directory_fingerprint
    monkeypatch.setattr(
        schedules_module, "directory_fingerprint", lambda directory: calls.append(directory) or real(directory)
    )
    return calls


def test_an_observed_change_is_listed_without_fingerprinting_in_the_tick(instance, plates, tmp_path, fingerprinted):
    for entity in plates:
        record_current_masks(entity, tmp_path)
    tifffile.imwrite(tmp_path / "b1" / "second field.tif", np.zeros((8, 8), np.uint8))
    observe(instance)
    assert preview(instance) == {plates[2].entity_id: "images changed"}
    assert fingerprinted == []


def test_plates_segmented_since_the_observation_are_fingerprinted_in_the_tick(
    instance, plates, tmp_path, fingerprinted
):
    observe(instance)
    record_current_masks(plates[0], tmp_path)
    tifffile.imwrite(tmp_path / "a1" / "second field.tif", np.zeros((8, 8), np.uint8))
    reasons = ["images changed", "no masks", "no masks"]
    assert preview(instance) == {e.entity_id: reason for e, reason in zip(plates, reasons, strict=True)}
    assert fingerprinted == [plates[0].properties["image_directory"]]


def test_a_directory_observed_missing_is_not_requested(instance, plates):
    shutil.rmtree(plates[2].properties["image_directory"])
    observe(instance)
    assert preview(instance) == {plates[0].entity_id: "no masks", plates[1].entity_id: "no masks"}


def test_a_ticks_store_statements_do_not_grow_with_the_plates(
    instance, plates, tmp_path, store_statements  # noqa: F811
):
    sent, segmented = {}, 0
    for count in (10, 200):
        added = add_plates(plates[0], count - len(EntityStore().entity_ids("image_directory")))
        instance.add_dynamic_partitions(image_directory_partitions.name, [e.entity_id for e in added])
        record_current_masks(added[-1], tmp_path)
        segmented += 1
        stale, sent[count] = statements_of(store_statements, lambda: preview(instance))  # noqa: B023
        assert len(stale) == count - segmented
    assert sent[10] == sent[200]
