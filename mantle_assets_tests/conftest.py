"""Shared fixtures: isolated Mantle/Dagster homes and crops of the BBBC014 demo plate."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from dagster import DagsterInstance

from mantle_assets.demo import default_data_candidates

CROP = (slice(200, 360), slice(200, 360))
TWO_WELLS = ("01-A-01", "12-A-12")


def bbbc014_images() -> Path | None:
    for candidate in default_data_candidates():
        if (candidate / "images").is_dir():
            return candidate / "images"
    return None


def missing_data(reason: str):
    """Skip for lack of shared data, except in CI (MANTLE_REQUIRE_DATA=1), where it is a failure."""
    if os.environ.get("MANTLE_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason} (MANTLE_REQUIRE_DATA=1)")
    pytest.skip(reason)


EIGHT_WELLS = ("01-A-01", "02-A-02", "03-A-03", "04-A-04", "09-A-09", "10-A-10", "11-A-11", "12-A-12")


def register_crop_per_well(tmp_path: Path, store, wells, experiment_name: str) -> list:
    """Register one directory per well holding its DNA channel (Channel2) cropped to ``CROP``."""
    from mantle_assets.registration import register_image_directory

    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found")
    entities = []
    for well in wells:
        directory = tmp_path / well
        directory.mkdir()
        pixels = tifffile.imread(images / f"Channel2-{well}.tif")
        tifffile.imwrite(directory / f"{well}.tif", np.ascontiguousarray(pixels[CROP]))
        entities.append(register_image_directory(store, directory, experiment_name))
    return entities


@pytest.fixture(autouse=True)
def mantle_home(tmp_path, monkeypatch) -> Path:
    """A fresh $MANTLE_HOME and $DAGSTER_HOME for every test: nothing lands in the working tree."""
    home = tmp_path / "mantle home"
    monkeypatch.setenv("MANTLE_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    (home / "dagster").mkdir(parents=True)
    return home


@pytest.fixture
def instance(mantle_home):
    """A real Dagster instance in the test's DAGSTER_HOME."""
    with DagsterInstance.local_temp(str(mantle_home / "dagster")) as local:
        yield local


@pytest.fixture
def bbbc014_crops(tmp_path) -> Path:
    """Two BBBC014 wells cropped to 160x160, both channels, named as on the plate."""
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found (set MANTLE_DEMO_DATA)")
    directory = tmp_path / "plate crops"
    directory.mkdir()
    for well in TWO_WELLS:
        for channel in (1, 2):
            pixels = tifffile.imread(images / f"Channel{channel}-{well}.tif")
            tifffile.imwrite(directory / f"Channel{channel}-{well}.tif", np.ascontiguousarray(pixels[CROP]))
    return directory


@pytest.fixture
def bundled_model_name() -> str:
    from mantle_assets.models.registry import bundled_specs

    specs = [s for s in bundled_specs() if s.offline]
    if not specs:
        pytest.fail("no bundled model in the package")
    return specs[0].name
