"""Settings read from the environment: data roots (what may be registered), mask root, pixel limit."""

import os

import pytest

from mantle_assets.imaging.io import MAX_FIELD_PIXELS
from mantle_assets.settings import OutsideDataRootsError, check_data_path, data_roots, mask_root, max_field_pixels


def test_without_roots_system_directories_are_refused(monkeypatch):
    monkeypatch.delenv("MANTLE_DATA_ROOTS", raising=False)
    with pytest.raises(OutsideDataRootsError, match=r"image_directory /etc is in a system directory"):
        check_data_path("/etc", "image_directory")


def test_without_roots_other_folders_are_accepted(tmp_path, monkeypatch):
    monkeypatch.delenv("MANTLE_DATA_ROOTS", raising=False)
    assert check_data_path(tmp_path, "image_directory") == tmp_path.resolve()


def test_roots_confine_registration(tmp_path, monkeypatch):
    inside, outside = tmp_path / "data" / "plate", tmp_path / "elsewhere"
    inside.mkdir(parents=True)
    outside.mkdir()
    monkeypatch.setenv("MANTLE_DATA_ROOTS", os.pathsep.join([str(tmp_path / "data"), str(tmp_path / "more")]))
    assert check_data_path(inside, "image_directory") == inside.resolve()
    with pytest.raises(OutsideDataRootsError, match=r"elsewhere is outside the data roots \(MANTLE_DATA_ROOTS="):
        check_data_path(outside, "image_directory")


def test_symbolic_links_cannot_lead_out_of_the_roots(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "escape").symlink_to("/etc")
    monkeypatch.setenv("MANTLE_DATA_ROOTS", str(tmp_path / "data"))
    with pytest.raises(OutsideDataRootsError, match=r"image_directory /etc is outside"):
        check_data_path(tmp_path / "data" / "escape", "image_directory")


def test_roots_are_split_without_breaking_uris(tmp_path, monkeypatch):
    monkeypatch.setenv("MANTLE_DATA_ROOTS", f"{tmp_path}:s3://lab/plates/:GS://b:{tmp_path / 'more'}")
    assert data_roots() == [tmp_path.resolve(), "s3://lab/plates", "gs://b", (tmp_path / "more").resolve()]


def test_without_roots_uris_are_accepted_normalised(monkeypatch):
    monkeypatch.delenv("MANTLE_DATA_ROOTS", raising=False)
    assert check_data_path("S3://anywhere/plate1/", "image_directory") == "s3://anywhere/plate1"


@pytest.mark.parametrize("uri", ["s3://lab/plates/p1", "s3://lab/plates", "s3://lab/plates/a/b/"])
def test_uri_roots_admit_uris_under_them(uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MANTLE_DATA_ROOTS", f"{tmp_path}:s3://lab/plates")
    assert check_data_path(uri, "image_directory") == uri.rstrip("/")


@pytest.mark.parametrize(
    "uri",
    [
        "s3://lab/plates-old/p1",  # a sibling sharing the root's first letters
        "s3://lab/plates/../secret",
        "s3://lab/other",
        "gs://lab/plates/p1",  # the same bucket and prefix on another store
        "memory://lab/plates/p1",
    ],
)
def test_uri_roots_refuse_uris_outside_them(uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MANTLE_DATA_ROOTS", f"{tmp_path}:s3://lab/plates")
    with pytest.raises(OutsideDataRootsError, match=r"outside the data roots \(MANTLE_DATA_ROOTS=.*:s3://lab/plates\)$"):
        check_data_path(uri, "image_directory")


def test_uri_roots_do_not_admit_local_paths_nor_local_roots_uris(tmp_path, monkeypatch):
    monkeypatch.setenv("MANTLE_DATA_ROOTS", "s3://lab/plates")
    with pytest.raises(OutsideDataRootsError, match="is outside the data roots"):
        check_data_path(tmp_path, "image_directory")
    monkeypatch.setenv("MANTLE_DATA_ROOTS", str(tmp_path))
    with pytest.raises(OutsideDataRootsError, match="s3://lab/plates is outside the data roots"):
        check_data_path("s3://lab/plates", "image_directory")


def test_mask_root_is_local_or_a_uri(tmp_path, monkeypatch, mantle_home):
    monkeypatch.delenv("MANTLE_MASK_ROOT", raising=False)
    assert mask_root() == mantle_home / "masks"
    monkeypatch.setenv("MANTLE_MASK_ROOT", str(tmp_path / "masks"))
    assert mask_root() == tmp_path / "masks"
    monkeypatch.setenv("MANTLE_MASK_ROOT", "s3://lab/masks/")
    assert mask_root() == "s3://lab/masks"


def test_max_field_pixels_defaults_to_the_readers_limit(monkeypatch):
    monkeypatch.delenv("MANTLE_MAX_FIELD_PIXELS", raising=False)
    assert max_field_pixels() == MAX_FIELD_PIXELS == 2**28
    monkeypatch.setenv("MANTLE_MAX_FIELD_PIXELS", " ")
    assert max_field_pixels() == MAX_FIELD_PIXELS
    monkeypatch.setenv("MANTLE_MAX_FIELD_PIXELS", " 63 ")
    assert max_field_pixels() == 63


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5"])
def test_a_bad_max_field_pixels_is_named(monkeypatch, value):
    monkeypatch.setenv("MANTLE_MAX_FIELD_PIXELS", value)
    with pytest.raises(ValueError) as raised:
        max_field_pixels()
    assert str(raised.value) == f"MANTLE_MAX_FIELD_PIXELS must be a positive whole number, got {value!r}"
