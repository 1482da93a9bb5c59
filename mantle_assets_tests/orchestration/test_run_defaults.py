"""Runs launched without config (the UI's Materialize, backfills) use the experiment's defaults."""

import numpy as np
import pytest
import tifffile

from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.assets import prepare_segmentation
from mantle_assets.orchestration.config import PLATFORM_DEFAULTS, SegmentationConfig
from mantle_assets.registration import register_image_directory


@pytest.fixture
def plate(tmp_path):
    """A registered two-channel, one-field directory whose experiment segments channel 2 at 12 px."""
    directory = tmp_path / "plate"
    directory.mkdir()
    for channel in (1, 2):
        tifffile.imwrite(directory / f"Channel{channel}-01-A-01.tif", np.zeros((16, 16), np.uint8))
    return register_image_directory(
        EntityStore(), directory, "exp", segmentation_defaults={"nuclei_channel": 2, "cytoplasm_channel": 2,
                                                                "diameter": "12"}
    )


def test_an_empty_config_sets_nothing():
    assert SegmentationConfig().model_dump() == dict.fromkeys(PLATFORM_DEFAULTS)


def test_given_values_win_over_the_experiments_then_the_platforms():
    resolved = SegmentationConfig(diameter="20", min_size=3).resolve({"diameter": "12", "nuclei_channel": 2})
    assert resolved.model_dump() == PLATFORM_DEFAULTS | {"diameter": "20", "min_size": 3, "nuclei_channel": 2}
    assert resolved.resolve({"diameter": "99"}) == resolved  # resolving twice changes nothing


def test_settings_and_parameters_of_a_partial_config_use_the_platform_defaults():
    config = SegmentationConfig(nuclei_channel=1, cytoplasm_channel=1)
    assert config.parameters() == {"cellpose_model": PLATFORM_DEFAULTS["cellpose_model"], "nuclei_channel": 1,
                                   "cytoplasm_channel": 1, "diameter": "None"}
    assert config.settings().min_size == PLATFORM_DEFAULTS["min_size"]


def test_preparing_an_empty_config_checks_the_experiments_defaults(plate):
    _, _, settings, spec = prepare_segmentation(EntityStore(), plate.entity_id, SegmentationConfig())
    assert settings.diameter == 12.0
    assert spec.name == PLATFORM_DEFAULTS["cellpose_model"]
