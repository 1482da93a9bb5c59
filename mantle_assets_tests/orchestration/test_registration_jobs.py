"""Registering a plate and setting defaults from the launchpad: the jobs run with the config a scientist types."""

import json

import numpy as np
import pytest
import tifffile
import yaml
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from mantle_assets.definitions import defs
from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import image_directory_version
from mantle_assets.orchestration.partitions import image_directory_partitions, partition_key
from mantle_assets.registration import register_image_directory


def write_plate(directory, wells=("01-A-01", "02-A-02")):
    """A per-channel plate named as BBBC014 names it: Channel<c>-<nn>-<row>-<col>.tif."""
    directory.mkdir()
    for well in wells:
        for channel in (1, 2):
            tifffile.imwrite(directory / f"Channel{channel}-{well}.tif", np.full((8, 8), channel, np.uint8))
    return directory


@pytest.fixture
def plate(tmp_path):
    return write_plate(tmp_path / "plate 1")


@pytest.fixture
def layout(tmp_path):
    path = tmp_path / "layout.csv"
    path.write_text("well,dose,control\nA01,0,-1\nA02,10,1\n")
    return path


@pytest.fixture
def instance(mantle_home):
    with DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


def launch(instance, job_name: str, typed: str):
    """Run a job with the config as typed in the launchpad's YAML editor."""
    return defs.resolve_job_def(job_name).execute_in_process(
        run_config=yaml.safe_load(typed), instance=instance, raise_on_error=False
    )


def registration(directory, experiment="TNF dose", extra=""):
    # json.dumps quotes a path as YAML reads it, spaces and all.
    return f"""
ops:
  register_directory:
    config:
      directory: {json.dumps(str(directory))}
      experiment_name: {experiment}
{extra}"""


def observations(instance, entity_id):
    partition = partition_key(EntityStore().get(entity_id))
    return instance.fetch_observations(
        AssetRecordsFilter(asset_key=AssetKey("image_directory"), asset_partitions=[partition]), limit=10
    ).records


def partition_entities(instance) -> list[str]:
    """The entity ids the image_directory partitions are of, in order."""
    return [key.split(" ")[0] for key in instance.get_dynamic_partitions(image_directory_partitions.name)]


def failure_of(result):
    (failure,) = [event.step_failure_data for event in result.get_step_failure_events()]
    return failure


def test_registration_records_the_plate_adds_its_partition_and_shows_what_was_found(instance, plate, layout):
    typed = registration(plate, extra=f"""
      channel_names: [NFkB, DNA]
      plate_layout: {json.dumps(str(layout))}
      segmentation_defaults:
        nuclei_channel: DNA
        cytoplasm_channel: DNA
        diameter: 12
""")
    result = launch(instance, "register_image_directory", typed)
    assert result.success

    (entity,) = EntityStore().list("image_directory")
    assert entity.entity_id == "E000001"
    assert entity.properties["experiment_name"] == "TNF dose"
    assert entity.properties["channel_names"] == ["NFkB", "DNA"]
    assert entity.properties["plate_layout"] == str(layout)
    # DNA is the plate's channel 2; the diameter is recorded as Mantle's text.
    assert entity.properties["segmentation_defaults"] == {"nuclei_channel": 2, "cytoplasm_channel": 2,
                                                          "diameter": "12"}
    # The key carries the experiment and folder name: typed into the UI's partition filter, either finds it.
    assert instance.get_dynamic_partitions(image_directory_partitions.name) == [f"E000001 TNF dose / {plate.name}"]

    (observation,) = observations(instance, "E000001")
    assert observation.run_id == result.run_id
    metadata = observation.asset_observation.metadata
    assert metadata["entity_id"].value == "E000001"
    assert metadata["summary"].value == "2 fields x 2 channels (Channel1, Channel2), wells A01, A02, scheme bbbc014"
    assert metadata["fields"].value == 2
    assert metadata["wells"].value == "A01, A02"
    assert [(r.data["channel"], r.data["label"], r.data["name"]) for r in metadata["channels"].value.records] == [
        (1, "Channel1", "NFkB"), (2, "Channel2", "DNA")]
    assert metadata["naming_scheme"].value == "bbbc014"
    assert metadata["plate_layout"].value == str(layout)
    assert metadata["already_registered"].value is False
    # The data version the image_directory observation records, so that masks made next are not stale at once.
    assert observation.asset_observation.tags[DATA_VERSION_TAG] == image_directory_version(str(plate)).value


def test_registering_the_same_directory_again_shows_the_entity_and_records_no_second(instance, plate):
    typed = registration(plate, extra="""
      segmentation_defaults:
        nuclei_channel: Channel2
""")
    assert launch(instance, "register_image_directory", typed).success
    again = launch(instance, "register_image_directory", typed)
    assert again.success
    assert [e.entity_id for e in EntityStore().list()] == ["E000001"]
    assert partition_entities(instance) == ["E000001"]
    latest = observations(instance, "E000001")[0]
    assert (latest.run_id, latest.asset_observation.metadata["already_registered"].value) == (again.run_id, True)
    assert any("already registered as E000001" in entry.user_message for entry in instance.all_logs(again.run_id))

    other = launch(instance, "register_image_directory", registration(plate, experiment="IL-1"))
    assert failure_of(other).user_failure_data.description == (
        f"{plate} is already registered as E000001 with experiment_name 'TNF dose', not 'IL-1'; "
        "pass --again to register it anew with these")
    anew = launch(instance, "register_image_directory", registration(plate, "IL-1", "      again: true\n"))
    assert anew.success
    assert [e.entity_id for e in EntityStore().list()] == ["E000001", "E000002"]
    assert partition_entities(instance) == ["E000001", "E000002"]


def test_a_plate_in_object_storage_is_registered_by_its_uri(instance, plate, s3):
    uri = s3.put_directory(plate, "plates/plate 1")
    assert launch(instance, "register_image_directory", registration(uri)).success
    (entity,) = EntityStore().list("image_directory")
    assert entity.properties["image_directory"] == uri
    assert partition_entities(instance) == [entity.entity_id]
    (observation,) = observations(instance, entity.entity_id)
    assert observation.asset_observation.metadata["fields"].value == 2


@pytest.mark.parametrize(
    ("arrange", "extra", "reason"),
    [
        (lambda tmp: tmp / "no such folder", "", "no such folder does not exist"),
        (lambda tmp: write_plate(tmp / "plate"), "      plate_layout: {layout}\n",
         "names none of the directory's wells (e.g. A01)"),
        (lambda tmp: write_plate(tmp / "plate"), "      channel_names: [NFkB]\n",
         "channel_names: 1 name(s) given but the images have 2 channel(s)"),
        (lambda tmp: write_plate(tmp / "plate"), "      naming_pattern: '(?P<well>[A-H]\\d+'\n",
         "is not a regular expression: missing ), unterminated subpattern"),
        (lambda tmp: write_plate(tmp / "plate"), "      naming_pattern: '(?P<well>[A-H]\\d+)-(?P<channel>GFP|DAPI)'\n",
         "4 of 4 image files do not match the naming pattern"),
        (lambda tmp: write_plate(tmp / "plate"), "      segmentation_defaults: {{nuclei_channel: Mito}}\n",
         "nuclei_channel='Mito' names no channel; the channels are 1 Channel1, 2 Channel2"),
        (lambda tmp: write_plate(tmp / "plate"), "      segmentation_defaults: {{diameter: -3}}\n",
         "diameter must be a positive number of pixels, got '-3'"),
    ],
    ids=["missing folder", "layout of other wells", "too few channel names", "bad pattern", "pattern of other names",
         "unknown channel",
         "negative diameter"],
)
def test_a_refused_registration_fails_the_run_with_the_one_line_reason_and_records_nothing(
    instance, tmp_path, arrange, extra, reason
):
    other_wells = tmp_path / "other wells.csv"
    other_wells.write_text("well,dose,control\nC05,1,0\n")
    result = launch(instance, "register_image_directory",
                    registration(arrange(tmp_path), extra=extra.format(layout=json.dumps(str(other_wells)))))
    assert not result.success
    failure = failure_of(result)
    assert failure.error.cls_name == "Failure"
    description = failure.user_failure_data.description
    assert reason in description and "\n" not in description and "Traceback" not in description
    assert EntityStore().list(include_archived=True) == []
    assert instance.get_dynamic_partitions(image_directory_partitions.name) == []
    assert instance.fetch_observations(AssetRecordsFilter(asset_key=AssetKey("image_directory")), limit=1).records == []


def defaults_of(store, entity_ids):
    return [store.get(entity_id).properties["segmentation_defaults"] for entity_id in entity_ids]


def test_defaults_are_set_on_an_experiment_and_on_an_entity(instance, tmp_path):
    store = EntityStore()
    entity_ids = [
        register_image_directory(store, write_plate(tmp_path / plate), "exp", channel_names=names).entity_id
        for plate, names in (("plate a", ["NFkB", "DNA"]), ("plate b", ["DNA", "GFP"]))
    ]
    on_experiment = launch(instance, "set_segmentation_defaults", """
ops:
  set_defaults:
    config:
      experiment_name: exp
      segmentation_defaults:
        nuclei_channel: DNA
        cytoplasm_channel: dna
        diameter: 12
""")
    assert on_experiment.success
    # DNA is channel 2 of plate a and channel 1 of plate b.
    assert defaults_of(store, entity_ids) == [
        {"nuclei_channel": 2, "cytoplasm_channel": 2, "diameter": "12"},
        {"nuclei_channel": 1, "cytoplasm_channel": 1, "diameter": "12"}]
    (output,) = [event.event_specific_data for event in on_experiment.all_events if event.is_successful_output]
    shown = [(r.data["entity_id"], r.data["nuclei_channel"], r.data["diameter"])
             for r in output.metadata["defaults"].value.records]
    assert shown == [(entity_ids[0], 2, "12"), (entity_ids[1], 1, "12")]
    assert store.history(entity_ids[0])[-1].run_id == on_experiment.run_id

    on_entity = launch(instance, "set_segmentation_defaults", f"""
ops:
  set_defaults:
    config:
      entity_id: {entity_ids[1]}
      segmentation_defaults: {{min_size: 30}}
""")
    assert on_entity.success
    assert defaults_of(store, entity_ids) == [
        {"nuclei_channel": 2, "cytoplasm_channel": 2, "diameter": "12"},
        {"nuclei_channel": 1, "cytoplasm_channel": 1, "diameter": "12", "min_size": 30}]

    # NFkB is no channel of plate b: refused in one line, and neither plate changes.
    refused = launch(instance, "set_segmentation_defaults", """
ops:
  set_defaults:
    config:
      experiment_name: exp
      segmentation_defaults: {nuclei_channel: NFkB}
""")
    assert failure_of(refused).user_failure_data.description == (
        f"{entity_ids[1]}: nuclei_channel='NFkB' names no channel; the channels are 1 DNA (Channel1), 2 GFP (Channel2)")
    assert defaults_of(store, entity_ids) == [
        {"nuclei_channel": 2, "cytoplasm_channel": 2, "diameter": "12"},
        {"nuclei_channel": 1, "cytoplasm_channel": 1, "diameter": "12", "min_size": 30}]
    unknown = launch(instance, "set_segmentation_defaults", """
ops:
  set_defaults:
    config:
      experiment_name: no such experiment
      segmentation_defaults: {diameter: 12}
""")
    assert failure_of(unknown).user_failure_data.description == (
        "no image directories in experiment 'no such experiment'")
