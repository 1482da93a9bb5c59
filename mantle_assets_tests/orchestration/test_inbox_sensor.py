"""The inbox sensor on a real instance: quiet period, sidecars, never twice, failures reported once."""

import json
import os
import time

import numpy as np
import pytest
import tifffile
from dagster import build_sensor_context

from mantle_assets.entities import EntityStore
from mantle_assets.inbox import read_sidecar
from mantle_assets.orchestration.resources import EntityStoreResource, InboxResource
from mantle_assets.orchestration.sensors import inbox_sensor

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
    for item in [*folder.iterdir(), folder]:
        os.utime(item, (past, past))


def tick(instance, inbox, cursor=None):
    resources = {
        "entity_store": EntityStoreResource(),
        "inbox": InboxResource(directory=str(inbox), quiet_seconds=QUIET),
    }
    context = build_sensor_context(instance=instance, cursor=cursor, resources=resources)
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


def test_never_registered_twice(instance, inbox):
    copy_plate(inbox, "plate-1", age_seconds=QUIET * 2)
    first = tick(instance, inbox)
    tick(instance, inbox, first.cursor)
    tick(instance, inbox)  # even with a lost cursor
    assert len(EntityStore().list("image_directory")) == 1


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
    context = build_sensor_context(
        instance=instance, resources={"entity_store": EntityStoreResource(), "inbox": InboxResource()})
    assert "MANTLE_INBOX is not set" in inbox_sensor(context).skip_reason.skip_message
