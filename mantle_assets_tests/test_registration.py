import os

import numpy as np
import pytest
import tifffile

from mantle_assets.entities import EntityStore
from mantle_assets.imaging.fields import ImageDirectoryError
from mantle_assets.registration import directory_fingerprint, register_image_directory, registered_directories
from mantle_assets.settings import OutsideDataRootsError
from mantle_assets.storage import remote_fingerprint


@pytest.fixture
def plate(tmp_path):
    directory = tmp_path / "plate"
    directory.mkdir()
    for well in ("01-A-01", "02-A-02"):
        for channel in (1, 2):
            tifffile.imwrite(directory / f"Channel{channel}-{well}.tif", np.full((8, 8), channel, np.uint8))
    (directory / "notes.txt").write_text("not an image")
    return directory


def test_fingerprint_changes_when_an_image_changes(plate):
    count, before = directory_fingerprint(plate)
    assert count == 4
    assert directory_fingerprint(plate) == (4, before)
    target = plate / "Channel1-01-A-01.tif"
    stat = target.stat()
    tifffile.imwrite(target, np.zeros((8, 8), np.uint8))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert directory_fingerprint(plate)[1] != before


def test_fingerprint_ignores_non_images(plate):
    before = directory_fingerprint(plate)
    (plate / "more notes.txt").write_text("still not an image")
    assert directory_fingerprint(plate) == before


def test_registration_records_grouping_and_fingerprint(plate, tmp_path):
    store = EntityStore(tmp_path / "db" / "mantle.duckdb")
    entity = register_image_directory(store, plate, "dose test")
    assert entity.entity_id == "E000001"
    assert entity.properties["experiment_name"] == "dose test"
    grouping = entity.properties["field_grouping"]
    assert (grouping["scheme"], grouping["n_fields"], grouping["n_channels"]) == ("bbbc014", 2, 2)
    assert grouping["wells"] == {"01-A-01": "A01", "02-A-02": "A02"}
    assert grouping["summary"] == "2 fields x 2 channels (Channel1, Channel2), wells A01, A02, scheme bbbc014"
    assert entity.properties["file_count"] == 4
    assert entity.properties["fingerprint"] == directory_fingerprint(plate)[1]


def test_directory_without_images_is_refused_and_nothing_recorded(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images")
    store = EntityStore(tmp_path / "db" / "mantle.duckdb")
    with pytest.raises(ImageDirectoryError, match="no images in"):
        register_image_directory(store, empty, "x")
    assert store.list() == []


def test_channel_names_and_plate_layout_are_recorded(plate, tmp_path):
    layout = tmp_path / "layout.csv"
    layout.write_text("well,dose,control\nA01,0,-1\nA02,10,1\n")
    entity = register_image_directory(EntityStore(), plate, "x", channel_names=["NFkB", "DNA"], plate_layout=layout)
    assert entity.properties["channel_names"] == ["NFkB", "DNA"]
    assert entity.properties["plate_layout"] == str(layout)


@pytest.mark.parametrize(
    ("names", "layout_text", "fragment"),
    [
        (["NFkB"], None, "channel_names: 1 name(s) given but the images have 2 channel(s)"),
        (None, "well,dose\nA01,1\n", "is not a plate layout"),
        (None, "well,dose,control\nC05,1,0\n", "names none of the directory's wells (e.g. A01)"),
    ],
)
def test_bad_channel_names_or_layouts_record_nothing(plate, tmp_path, names, layout_text, fragment):
    layout = None
    if layout_text is not None:
        layout = tmp_path / "layout.csv"
        layout.write_text(layout_text)
    store = EntityStore()
    with pytest.raises(ValueError) as error:
        register_image_directory(store, plate, "x", channel_names=names, plate_layout=layout)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert store.list() == []


def test_a_layout_needs_fields_named_by_well(tmp_path):
    directory = tmp_path / "no wells"
    directory.mkdir()
    tifffile.imwrite(directory / "image.tif", np.zeros((8, 8), np.uint8))
    layout = tmp_path / "layout.csv"
    layout.write_text("well,dose,control\nA01,1,0\n")
    with pytest.raises(ValueError, match="no field name in .* holds a well like A01"):
        register_image_directory(EntityStore(), directory, plate_layout=layout)


# --------------------------------------------------------------------------- registering a directory twice


def test_the_resolved_path_is_recorded(plate, tmp_path):
    link = tmp_path / "current plate"
    link.symlink_to(plate)
    entity = register_image_directory(EntityStore(), link, "x")
    assert entity.properties["image_directory"] == plate.resolve().as_posix()
    assert entity.name == "plate"


@pytest.mark.parametrize("spelling", ["same", "trailing slash", "symlink", "relative", "registered by symlink"])
def test_a_registered_directory_is_not_registered_again(plate, tmp_path, monkeypatch, spelling):
    link = tmp_path / "link"
    link.symlink_to(plate)
    monkeypatch.chdir(tmp_path)
    first_path, second_path = {
        "same": (plate, plate),
        "trailing slash": (plate, f"{plate}/"),
        "symlink": (plate, link),
        "relative": (plate, "plate"),
        "registered by symlink": (link, plate),
    }[spelling]
    store = EntityStore()
    first = register_image_directory(store, first_path, "x", channel_names=["NFkB", "DNA"])
    second = register_image_directory(store, second_path, "x")
    assert second == first == store.get(first.entity_id)  # the same entity, not changed
    assert [e.entity_id for e in store.list()] == [first.entity_id]
    assert registered_directories(store, [second_path, tmp_path]) == {second_path: first}


def test_a_directory_recorded_before_paths_were_resolved_is_found_by_that_path(plate, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(plate)
    store = EntityStore()
    legacy = store.register("image_directory", "link", {"image_directory": link})  # the path as given, unresolved
    assert register_image_directory(store, link) == legacy


def test_again_registers_anew_and_the_newest_is_then_found(plate):
    store = EntityStore()
    first = register_image_directory(store, plate, "x")
    second = register_image_directory(store, plate, "y", again=True)
    assert second.entity_id != first.entity_id and second.properties["experiment_name"] == "y"
    assert register_image_directory(store, plate) == second


def test_an_archived_registration_does_not_count(plate):
    store = EntityStore()
    first = register_image_directory(store, plate, "x")
    store.archive(first.entity_id)
    second = register_image_directory(store, plate, "x")
    assert second.entity_id != first.entity_id
    assert registered_directories(store, [plate]) == {plate: second}
    assert registered_directories(store, [plate], include_archived=True) == {plate: second}
    store.archive(second.entity_id)
    assert registered_directories(store, [plate]) == {}
    assert registered_directories(store, [plate], include_archived=True) == {plate: store.get(second.entity_id)}


def test_other_values_than_recorded_are_refused_in_one_line(plate, tmp_path):
    layout = tmp_path / "layout.csv"
    layout.write_text("well,dose,control\nA01,0,-1\nA02,10,1\n")
    store = EntityStore()
    first = register_image_directory(store, plate, "TNF", channel_names=["NFkB", "DNA"], plate_layout=layout)
    # The values recorded, or none asked for: the existing entity.
    assert register_image_directory(store, plate, "TNF", channel_names=["NFkB", "DNA"], plate_layout=layout) == first
    assert register_image_directory(store, plate, name="plate") == first
    with pytest.raises(ValueError) as error:
        register_image_directory(store, plate, "IL-1", channel_names=["p65", "DNA"])
    assert str(error.value) == (
        f"{plate} is already registered as {first.entity_id} with experiment_name 'TNF', not 'IL-1' and "
        "channel_names ['NFkB', 'DNA'], not ['p65', 'DNA']; pass --again to register it anew with these"
    )
    with pytest.raises(ValueError, match=f"with plate_layout '{layout}', not '{tmp_path / 'other.csv'}'; "):
        register_image_directory(store, plate, plate_layout=tmp_path / "other.csv")
    bare = register_image_directory(store, plate, again=True)
    with pytest.raises(ValueError, match=f"as {bare.entity_id} with no segmentation_defaults, not {{'diameter'"):
        register_image_directory(store, plate, segmentation_defaults={"diameter": "12"})
    assert [e.entity_id for e in store.list()] == [first.entity_id, bare.entity_id]


# --------------------------------------------------------------------------- directories on object storage


def test_a_uri_directory_is_checked_on_a_copy_and_recorded_as_the_uri(plate, s3, mantle_home):
    uri = s3.put_directory(plate, "plates/plate")
    entity = register_image_directory(EntityStore(), f"{uri}/", "remote", channel_names=["NFkB", "DNA"])
    local = register_image_directory(EntityStore(), plate, "local")
    assert entity.properties["image_directory"] == uri == "s3://lab/plates/plate"
    assert entity.name == "plate"
    assert entity.properties["field_grouping"] == local.properties["field_grouping"]
    assert entity.properties["file_count"] == 4
    assert entity.properties["fingerprint"] == remote_fingerprint(uri)[1] == directory_fingerprint(uri)[1]
    assert EntityStore().get(entity.entity_id) == entity
    assert list((mantle_home / "staging").iterdir()) == []


def test_a_registered_uri_is_not_registered_again(plate, s3):
    uri = s3.put_directory(plate, "plates/plate")
    store = EntityStore()
    first = register_image_directory(store, uri, "remote")
    assert register_image_directory(store, f"{uri}/") == first
    assert register_image_directory(store, uri.replace("s3://", "S3://")) == first
    assert register_image_directory(store, uri, again=True).entity_id != first.entity_id


def test_a_bad_object_is_named_by_its_uri_and_nothing_recorded(plate, s3, mantle_home):
    (plate / "Channel2-02-A-02.tif").write_bytes(b"truncated")
    uri = s3.put_directory(plate, "plates/plate")
    store = EntityStore()
    with pytest.raises(ImageDirectoryError) as raised:
        register_image_directory(store, uri)
    assert str(raised.value).startswith(f"cannot read image {uri}/Channel2-02-A-02.tif: ")
    assert store.list() == []
    assert list((mantle_home / "staging").iterdir()) == []


def test_a_missing_uri_is_refused_in_one_line(s3):
    store = EntityStore()
    with pytest.raises(ImageDirectoryError, match=r"^image directory s3://lab/nothing does not exist$"):
        register_image_directory(store, s3.uri("nothing"))
    assert store.list() == []


def test_a_uri_outside_the_data_roots_is_refused_before_listing(monkeypatch):
    monkeypatch.setenv("MANTLE_DATA_ROOTS", "s3://lab/plates")
    with pytest.raises(OutsideDataRootsError, match="image_directory s3://lab/other is outside the data roots"):
        register_image_directory(EntityStore(), "s3://lab/other")
