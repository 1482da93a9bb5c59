import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch
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


@pytest.fixture
def model_file(tmp_path, bundled_model_name):
    """A copy of the bundled model's weights, as a user's model file."""
    weights = tmp_path / "my model"
    shutil.copyfile(resolve_model(bundled_model_name).path, weights)
    return weights


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


def test_a_model_file_path_resolves_to_itself(model_file, empty_cellpose_cache):
    spec = resolve_model(str(model_file))
    assert (spec.kind, spec.offline, spec.path) == ("file", True, model_file)


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


def test_nuclei_only_models_are_known_by_the_registry(empty_cellpose_cache, model_file):
    (bundled,) = [s for s in bundled_specs() if s.name == "mantle-nuclei-v1"]
    assert bundled.one_nuclear_channel and bundled.to_json()["one_nuclear_channel"] is True
    assert builtin_spec("nuclei").one_nuclear_channel
    assert not builtin_spec("cyto3").one_nuclear_channel
    assert not resolve_model(str(model_file)).one_nuclear_channel  # of unknown kind: not refused


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


def test_whole_cell_models_and_model_files_take_two_channels(empty_cellpose_cache, model_file):
    builtin_spec("cyto3").check_channels(2, 1)
    resolve_model(str(model_file)).check_channels(2, 1)


def test_a_bundled_model_is_recorded_as_trained_on_one_nuclear_channel(bundled_model_name, tmp_path, monkeypatch):
    """What `mantle bundle` writes: Mantle trains on one grayscale nuclear channel, so the bundle says so."""
    folder = bundle_model(resolve_model(bundled_model_name).path, "rebundled", {"diam_mean": 17.0},
                          bundled_dir=tmp_path)
    assert json.loads((folder / BUNDLED_METADATA).read_text())["one_nuclear_channel"] is True
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path)
    (spec,) = bundled_specs()
    assert (spec.name, spec.one_nuclear_channel) == ("rebundled", True)


class _RunsCode:
    """Pickles into a call of os.system, which unpickling would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _write_not_weights(kind, path):
    if kind == "text":
        path.write_text("root:SECRET-HASH:19000:0:99999:7:::\n")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "SECRET-HASH")
    elif kind == "other tensors":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "code":
        path.write_bytes(pickle.dumps(_RunsCode(path.with_name("ran")), protocol=2))
    elif kind == "truncated":
        path.write_bytes(resolve_model("mantle-nuclei-v1").path.read_bytes()[:100_000])


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("text", "not a PyTorch file"),
        ("zip", "torch.load(weights_only=True) failed (RuntimeError)"),
        ("other tensors", "no Cellpose 3 network in it"),
        ("code", "torch.load(weights_only=True) failed (UnpicklingError)"),
        ("truncated", "a damaged zip archive"),
    ],
)
def test_a_model_file_without_cellpose_weights_is_refused_without_quoting_it(tmp_path, kind, reason):
    weights = tmp_path / "model.pt"
    _write_not_weights(kind, weights)
    with pytest.raises(ModelResolutionError) as error:
        resolve_model(str(weights))
    assert str(error.value) == f"cellpose_model {weights} is not a Cellpose model file: {reason}"
    assert not (tmp_path / "ran").exists()  # the pickle's os.system call was not run


@pytest.mark.parametrize("system_file", ["/etc/shadow", "/etc/passwd"])
def test_a_system_file_is_refused_as_a_model(system_file, monkeypatch):
    if not os.path.isfile(system_file):
        pytest.skip(f"no {system_file} here")
    monkeypatch.delenv("MANTLE_DATA_ROOTS", raising=False)
    with pytest.raises(ModelResolutionError) as error:
        resolve_model(system_file)
    assert str(error.value) == (
        f"cellpose_model {system_file} is in a system directory; set MANTLE_DATA_ROOTS to the folders that hold "
        "your data")


def test_a_model_file_larger_than_any_cellpose_network_is_not_read(model_file, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "MAX_WEIGHTS_BYTES", 1 << 20)
    size = model_file.stat().st_size
    with pytest.raises(ModelResolutionError, match=rf"{size} bytes, more than MAX_WEIGHTS_BYTES \(1048576\)$"):
        resolve_model(str(model_file))
    # A small archive that unpacks to more than that: counted from the archive's directory, not unpacked.
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(2 << 20))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ModelResolutionError, match=r"unpacks to 2097152 bytes, more than MAX_WEIGHTS_BYTES"):
        resolve_model(str(bomb))


def test_model_files_are_confined_to_the_data_roots(tmp_path, model_file, empty_cellpose_cache, monkeypatch):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("MANTLE_DATA_ROOTS", str(data))
    outside = elsewhere / "model"
    shutil.copyfile(model_file, outside)
    (data / "link").symlink_to(outside)
    for given in (outside, data / ".." / "elsewhere" / "model", data / "link", model_file):
        with pytest.raises(ModelResolutionError) as error:
            resolve_model(str(given))
        assert str(error.value) == (
            f"cellpose_model {given.resolve()} is outside the data roots (MANTLE_DATA_ROOTS={data})")
    shutil.copyfile(model_file, data / "model")
    assert resolve_model(str(data / "model")).path == data / "model"
    # The platform's own folders: bundled models, Cellpose's cache, models trained here.
    trained = registry.mantle_home() / "models" / "mine" / "run" / "models" / "mine"
    trained.parent.mkdir(parents=True)
    for own in (resolve_model("mantle-nuclei-v1").path, empty_cellpose_cache / "lab model", trained):
        if not own.exists():
            shutil.copyfile(model_file, own)
        assert resolve_model(str(own)).kind == "file"
