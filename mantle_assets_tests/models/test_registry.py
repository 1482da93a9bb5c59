import json

import pytest
from cellpose import models as cellpose_models

from mantle_assets.imaging.segmentation import ParameterError
from mantle_assets.models import registry
from mantle_assets.models.bundling import bundle_model
from mantle_assets.models.registry import (
    BUNDLED_METADATA,
    ModelResolutionError,
    available_models,
    builtin_model_names,
    builtin_spec,
    bundled_specs,
    resolve_model,
)


@pytest.fixture
def empty_cellpose_cache(tmp_path, monkeypatch):
    # Cellpose reads CELLPOSE_LOCAL_MODELS_PATH once, at import; point its cache at a temp dir.
    cache = tmp_path / "cellpose cache"
    cache.mkdir()
    monkeypatch.setattr(cellpose_models, "MODEL_DIR", cache)
    return cache


def test_unknown_name_is_refused_listing_the_choices(empty_cellpose_cache):
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("nosuchmodel")
    message = str(error.value)
    assert message.startswith("unknown cellpose_model 'nosuchmodel'")
    assert "cyto3" in message and "nuclei" in message
    assert "\n" not in message


def test_builtin_found_in_cellpose_cache_is_offline(empty_cellpose_cache):
    (empty_cellpose_cache / "nucleitorch_0").write_bytes(b"weights")
    spec = resolve_model("nuclei")
    assert (spec.kind, spec.offline, spec.path) == ("builtin", True, empty_cellpose_cache / "nucleitorch_0")
    assert spec.diam_mean == 17.0


def test_builtin_neither_cached_nor_downloadable_names_offline_models(empty_cellpose_cache, monkeypatch):
    # A download server that refuses connections, so the real download path fails the same everywhere.
    monkeypatch.setattr(cellpose_models, "_MODEL_URL", "http://127.0.0.1:9/models")
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("cyto3")
    message = str(error.value)
    assert "'cyto3' is not in Cellpose's cache" in message
    assert "could not be downloaded" in message
    for spec in bundled_specs():
        assert spec.name in message
    assert not any(empty_cellpose_cache.iterdir())


def test_builtin_without_download_permission(empty_cellpose_cache):
    with pytest.raises(ModelResolutionError, match="models available offline"):
        resolve_model("cyto3", download=False)


def test_a_model_file_path_resolves_to_itself(tmp_path, empty_cellpose_cache):
    weights = tmp_path / "my model"
    weights.write_bytes(b"weights")
    spec = resolve_model(str(weights))
    assert (spec.kind, spec.offline, spec.path) == ("file", True, weights)


def test_bundled_models_are_listed_offline_with_their_files():
    specs = bundled_specs()
    assert specs, "the package ships at least one model"
    for spec in specs:
        assert spec.offline and spec.path.is_file()
        assert resolve_model(spec.name) == spec


def test_available_models_cover_bundled_and_every_builtin(empty_cellpose_cache):
    names = [spec.name for spec in available_models()]
    assert names[: len(bundled_specs())] == [s.name for s in bundled_specs()]
    assert set(builtin_model_names()) <= set(names)
    assert len(names) == len(set(names))
    assert not any("transformer" in name for name in names)


def test_nuclei_only_models_are_known_by_the_registry(empty_cellpose_cache, tmp_path):
    (bundled,) = [s for s in bundled_specs() if s.name == "mantle-nuclei-v1"]
    assert bundled.one_nuclear_channel and bundled.to_json()["one_nuclear_channel"] is True
    assert builtin_spec("nuclei").one_nuclear_channel
    assert not builtin_spec("cyto3").one_nuclear_channel
    weights = tmp_path / "my model"
    weights.write_bytes(b"weights")
    assert not resolve_model(str(weights)).one_nuclear_channel  # of unknown kind: not refused


def test_a_nuclei_only_model_refuses_a_whole_cell_request(bundled_model_name):
    spec = resolve_model(bundled_model_name)
    spec.check_channels(2, 2)
    spec.check_channels(0, 0)  # grayscale of a one-channel image
    with pytest.raises(ParameterError) as error:
        spec.check_channels(2, 1)
    assert str(error.value) == (
        f"cellpose_model '{bundled_model_name}' segments nuclei in one channel, but cytoplasm_channel=1 differs "
        "from nuclei_channel=2 (a whole-cell request): to segment nuclei set cytoplasm_channel equal to "
        "nuclei_channel (both 2); for whole cells use a whole-cell model such as cyto3 or a model file")
    with pytest.raises(ParameterError, match=r"cytoplasm_channel=3 differs from nuclei_channel=0 .* \(both 3\)"):
        spec.check_channels(0, 3)


def test_whole_cell_models_and_model_files_take_two_channels(empty_cellpose_cache, tmp_path):
    builtin_spec("cyto3").check_channels(2, 1)
    weights = tmp_path / "my model"
    weights.write_bytes(b"weights")
    resolve_model(str(weights)).check_channels(2, 1)


def test_a_bundled_model_is_recorded_as_trained_on_one_nuclear_channel(bundled_model_name, tmp_path, monkeypatch):
    """What `mantle bundle` writes: Mantle trains on one grayscale nuclear channel, so the bundle says so."""
    folder = bundle_model(resolve_model(bundled_model_name).path, "rebundled", {"diam_mean": 17.0},
                          bundled_dir=tmp_path)
    assert json.loads((folder / BUNDLED_METADATA).read_text())["one_nuclear_channel"] is True
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path)
    (spec,) = bundled_specs()
    assert (spec.name, spec.one_nuclear_channel) == ("rebundled", True)
