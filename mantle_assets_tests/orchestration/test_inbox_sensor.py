"""The inbox sensor on a real instance: quiet period, sidecars, never twice, failures reported once."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import tifffile
from dagster import build_sensor_context

from mantle_assets.entities import EntityStore
from mantle_assets.inbox import read_sidecar, scan_folder
from mantle_assets.orchestration.resources import EntityStoreResource, InboxResource
from mantle_assets.orchestration.sensors import inbox_sensor
from mantle_assets.registration import register_image_directory

QUIET = 60.0


@pytest.fixture
def inbox(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def copy_plate(inbox, name, *, age_seconds, sidecar=None, images=True):
    folder = inbox / name
    folder.mkdir()
    if images:
        for channel in (1, 2):
            tifffile.imwrite(folder / f"Channel{channel}-01-A-01.tif", np.zeros((8, 8), np.uint8))
    if sidecar is not None:
        (folder / "experiment.yaml").write_text(sidecar)
    age(folder, age_seconds)
    return folder


def age(folder, seconds):
    past = time.time() - seconds
    for item in [*folder.rglob("*"), folder]:
        os.utime(item, (past, past))


def tick(instance, inbox, cursor=None):
    resources = {
        "entity_store": EntityStoreResource(),
        "inbox": InboxResource(directory=str(inbox), quiet_seconds=QUIET),
    }
    with build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return inbox_sensor(context)


def registered_paths():
    return sorted(e.properties["image_directory"] for e in EntityStore().list("image_directory"))


def test_a_folder_is_registered_only_after_its_quiet_period(instance, inbox):
    fresh = copy_plate(inbox, "plate-1", age_seconds=5)
    first = tick(instance, inbox)
    assert registered_paths() == []
    assert "no new quiet" in first.skip_reason.skip_message
    age(fresh, QUIET + 5)
    tick(instance, inbox, first.cursor)
    assert registered_paths() == [str(fresh)]


def test_sidecar_names_the_experiment_and_its_defaults(instance, inbox):
    copy_plate(inbox, "plate-2", age_seconds=QUIET * 2, sidecar=(
        "experiment_name: TNF dose series\n"
        "segmentation_defaults: {nuclei_channel: 2, cytoplasm_channel: 2, diameter: '12'}\n"))
    copy_plate(inbox, "plate-3", age_seconds=QUIET * 2)
    tick(instance, inbox)
    by_name = {e.name: e.properties for e in EntityStore().list("image_directory")}
    assert by_name["plate-2"]["experiment_name"] == "TNF dose series"
    assert by_name["plate-2"]["segmentation_defaults"]["nuclei_channel"] == 2
    assert by_name["plate-3"]["experiment_name"] == "plate-3"


@pytest.mark.parametrize(
    ("defaults", "expected"),
    [
        ("{diameter: 12}", {"diameter": "12"}),
        ("{diameter: 12.5, min_size: '20'}", {"diameter": "12.5", "min_size": 20}),
        ("{diameter: null}", {"diameter": "None"}),
        ("{diameter: None}", {"diameter": "None"}),
        ("{diameter: 'None'}", {"diameter": "None"}),
        ("{nuclei_channel: '2', cytoplasm_channel: 2}", {"nuclei_channel": 2, "cytoplasm_channel": 2}),
        ("{flow_threshold: '0.6', batch_size: null}", {"flow_threshold": 0.6}),
    ],
)
def test_sidecar_values_are_read_as_the_cli_reads_them(instance, inbox, defaults, expected):
    copy_plate(inbox, "plate", age_seconds=QUIET * 2, sidecar=f"segmentation_defaults: {defaults}\n")
    tick(instance, inbox)
    (entity,) = EntityStore().list("image_directory")
    assert entity.properties["segmentation_defaults"] == expected


@pytest.mark.parametrize(
    ("sidecar", "reason"),
    [
        ("segmentation_defaults: {diameter: abc}",
         "segmentation_defaults: diameter must be a number of pixels or None, got 'abc'"),
        ("segmentation_defaults: {diameter: yes}",
         "segmentation_defaults: diameter must be a number of pixels or None, got True"),
        ("segmentation_defaults: {diameter: -3}",
         "segmentation_defaults: diameter must be a positive number of pixels, got '-3'"),
        ("segmentation_defaults: {nuclei_channel: [1]}",
         "segmentation_defaults: nuclei_channel must be a channel number or name, got [1]"),
        ("segmentation_defaults: {min_size: 2.5}", "segmentation_defaults: min_size must be a whole number, got 2.5"),
        ("segmentation_defaults: abc", "segmentation_defaults must be a mapping of parameters, got 'abc'"),
        ("segmentation_defaults: {diameter: 12, diamter: 13}",
         "segmentation_defaults: unknown parameter 'diamter' (known: cellpose_model, nuclei_channel, "
         "cytoplasm_channel, diameter, flow_threshold, cellprob_threshold, min_size, batch_size, cell_method)"),
        ("experiment: TNF", "unknown key 'experiment' (known: experiment_name, segmentation_defaults, channel_names, "
         "plate_layout, naming_pattern)"),
        ("experiment_name: [TNF]", "experiment_name must be text, got ['TNF']"),
    ],
)
def test_a_bad_sidecar_value_skips_its_folder_only(instance, inbox, sidecar, reason):
    bad = copy_plate(inbox, "plate-1", age_seconds=QUIET * 2, sidecar=sidecar)
    good = copy_plate(inbox, "plate-2", age_seconds=QUIET * 2, sidecar="experiment_name: 2024-05-01\n")
    first = tick(instance, inbox)
    (entity,) = EntityStore().list("image_directory")
    assert (entity.properties["image_directory"], entity.properties["experiment_name"]) == (str(good), "2024-05-01")
    assert json.loads(first.cursor) == {str(bad.resolve()): scan_folder(bad).signature}
    # Alone, the refusal is the tick's reason, one line naming the file, the field and the value.
    shutil.rmtree(good)
    alone = tick(instance, inbox)
    assert alone.skip_reason.skip_message == f"not registered: {bad / 'experiment.yaml'}: {reason}"
    assert tick(instance, inbox, alone.cursor).skip_reason.skip_message == "no new quiet inbox folders"


def test_a_folder_still_being_copied_into_a_sub_folder_is_not_registered(instance, inbox):
    plate = copy_plate(inbox, "plate", age_seconds=QUIET * 2)
    # Not an image, so that whether the platform reads sub-folders does not matter here: only the quiet period.
    (plate / "MetaData").mkdir()
    (plate / "MetaData" / "plate.HTD").write_text('"HTSInfoFile", Version 1.0\n')
    age(plate, QUIET * 2)
    os.utime(plate / "MetaData" / "plate.HTD")  # the copy is still writing it: changed just now
    first = tick(instance, inbox)
    assert registered_paths() == []
    age(plate, QUIET * 2)
    tick(instance, inbox, first.cursor)
    assert registered_paths() == [str(plate)]


def test_the_signature_covers_sub_folders_but_not_hidden_files(inbox):
    plate = copy_plate(inbox, "plate", age_seconds=QUIET * 2)
    well = plate / "A01"
    well.mkdir()
    tifffile.imwrite(well / "field.tif", np.zeros((8, 8), np.uint8))
    age(plate, QUIET * 2)
    before = scan_folder(plate)
    assert time.time() - before.last_change > QUIET

    (well / ".DS_Store").write_bytes(b"finder")
    (plate / ".snapshot").mkdir()
    (plate / ".snapshot" / "field.tif").write_bytes(b"old copy")
    age(plate / ".snapshot", QUIET * 2)
    hidden = scan_folder(plate)
    assert hidden.signature == before.signature
    assert time.time() - hidden.last_change < QUIET  # a hidden file written counts as a change (rsync's temporaries)

    age(plate, QUIET * 2)
    tifffile.imwrite(well / "field.tif", np.ones((8, 8), np.uint8))
    os.utime(well / "field.tif", (time.time() - QUIET * 2,) * 2)  # rewritten, dated back: the signature still moves
    assert scan_folder(plate).signature != before.signature
    (well / "second.tif").write_bytes(b"")
    assert time.time() - scan_folder(plate).last_change < QUIET


def test_a_dangling_link_does_not_keep_a_folder_unsettled(inbox):
    plate = copy_plate(inbox, "plate", age_seconds=QUIET * 2)
    (plate / "moved.tif").symlink_to(inbox / "gone.tif")
    past = time.time() - QUIET * 2
    os.utime(plate / "moved.tif", (past, past), follow_symlinks=False)
    os.utime(plate, (past, past))
    assert time.time() - scan_folder(plate).last_change > QUIET


def test_never_registered_twice(instance, inbox):
    copy_plate(inbox, "plate-1", age_seconds=QUIET * 2)
    first = tick(instance, inbox)
    tick(instance, inbox, first.cursor)
    tick(instance, inbox)  # even with a lost cursor
    assert len(EntityStore().list("image_directory")) == 1


def test_a_folder_registered_by_hand_or_archived_is_left_alone(instance, inbox, tmp_path):
    by_hand = copy_plate(inbox, "plate-1", age_seconds=QUIET * 2)
    archived = copy_plate(inbox, "plate-2", age_seconds=QUIET * 2)
    store = EntityStore()
    link = tmp_path / "link to plate-1"
    link.symlink_to(by_hand)
    register_image_directory(store, link, "by hand")
    store.archive(register_image_directory(store, archived, "retired").entity_id)
    assert tick(instance, inbox).skip_reason.skip_message == "no new quiet inbox folders"
    assert len(store.list("image_directory", include_archived=True)) == 2


def test_unreadable_folder_is_reported_once_and_retried_only_after_a_change(instance, inbox):
    broken = copy_plate(inbox, "notes-only", age_seconds=QUIET * 2, images=False)
    (broken / "readme.txt").write_text("no images")
    age(broken, QUIET * 2)
    first = tick(instance, inbox)
    assert registered_paths() == []
    assert str(broken.resolve()) in json.loads(first.cursor)
    second = tick(instance, inbox, first.cursor)
    assert second.cursor == first.cursor and registered_paths() == []
    tifffile.imwrite(broken / "field.tif", np.zeros((8, 8), np.uint8))
    age(broken, QUIET * 2)
    third = tick(instance, inbox, second.cursor)
    assert registered_paths() == [str(broken)]
    assert json.loads(third.cursor) == {}


def test_bad_sidecar_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "experiment.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"experiment\.json: not valid JSON") as error:
        read_sidecar(tmp_path)
    assert "\n" not in str(error.value)


def test_no_inbox_configured_skips(instance, monkeypatch):
    monkeypatch.delenv("MANTLE_INBOX", raising=False)
    with build_sensor_context(
        instance=instance, resources={"entity_store": EntityStoreResource(), "inbox": InboxResource()}
    ) as context:
        assert "MANTLE_INBOX is not set" in inbox_sensor(context).skip_reason.skip_message


def test_a_sidecar_registers_as_mantle_register_does(instance, inbox):
    folder = inbox / "lab plate"
    folder.mkdir()
    for channel in ("GFP", "Hoechst"):
        tifffile.imwrite(folder / f"B07-{channel}.tif", np.zeros((8, 8), np.uint8))
    (folder / "layout.csv").write_text("well,dose,control\nB07,1,0\n")
    (folder / "experiment.yaml").write_text(
        "naming_pattern: '(?P<well>[A-H]\\d+)-(?P<channel>\\w+)'\n"
        "channel_names: [NFkB, DNA]\n"
        "plate_layout: layout.csv\n"
        "segmentation_defaults: {nuclei_channel: DNA, cytoplasm_channel: hoechst}\n"
    )
    age(folder, QUIET * 2)
    tick(instance, inbox)
    (entity,) = EntityStore().list("image_directory")
    grouping = entity.properties["field_grouping"]
    assert (grouping["scheme"], grouping["channel_labels"], grouping["wells"]) == (
        "pattern", ["GFP", "Hoechst"], {"B07": "B07"})
    assert entity.properties["channel_names"] == ["NFkB", "DNA"]
    assert entity.properties["plate_layout"] == str(folder / "layout.csv")
    # Named channels become this plate's numbers: DNA by channel_names, hoechst by the file names.
    assert entity.properties["segmentation_defaults"] == {"nuclei_channel": 2, "cytoplasm_channel": 2}


def test_a_sidecar_naming_a_channel_the_plate_lacks_skips_its_folder(instance, inbox):
    copy_plate(inbox, "plate", age_seconds=QUIET * 2, sidecar="segmentation_defaults: {nuclei_channel: DAPI}\n")
    result = tick(instance, inbox)
    assert registered_paths() == []
    assert "nuclei_channel='DAPI' names no channel" in result.skip_reason.skip_message
