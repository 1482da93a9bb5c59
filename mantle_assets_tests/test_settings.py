"""Data roots: what may be registered."""

import os

import pytest

from mantle_assets.settings import OutsideDataRootsError, check_data_path


def test_without_roots_system_directories_are_refused(monkeypatch):
    monkeypatch.delenv("MANTLE_DATA_ROOTS", raising=False)
    with pytest.raises(OutsideDataRootsError, match=r"image_directory /etc is a system directory"):
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
