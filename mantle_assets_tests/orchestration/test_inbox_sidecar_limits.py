"""Hostile inbox sidecars on a real sensor and instance: bombs, oversized files, links and model paths out of the roots.

Each refused sidecar skips its own folder, with one line naming the file, while a good folder beside it registers
in the same tick.
"""

import os
import shutil
import time

import pytest

from mantle_assets.entities import EntityStore
from mantle_assets.inbox import MAX_SIDECAR_BYTES, read_sidecar
from mantle_assets.models.registry import resolve_model
from mantle_assets_tests.orchestration.test_inbox_sensor import QUIET, copy_plate, tick

# "Billion laughs" six levels deep (10**6 strings): enough to show the refusal, harmless should it come back.
ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + level)}: &{chr(98 + level)} [{', '.join([f'*{chr(97 + level)}'] * 10)}]\n" for level in range(5)
)


@pytest.fixture
def data(tmp_path, monkeypatch):
    """The data roots, holding the inbox."""
    root = tmp_path / "data"
    (root / "inbox").mkdir(parents=True)
    monkeypatch.setenv("MANTLE_DATA_ROOTS", str(root))
    return root


@pytest.fixture
def weights(tmp_path, bundled_model_name):
    """Real Cellpose weights outside the data roots."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(resolve_model(bundled_model_name).path, outside / "model")
    return outside / "model"


def settled(path):
    """Date a file or folder (and a folder's items) back past the quiet period; links themselves, not their targets."""
    past = time.time() - QUIET * 2
    for item in [*path.rglob("*"), path]:
        os.utime(item, (past, past), follow_symlinks=False)


def refused_beside_a_good_folder(instance, inbox, sidecar_name, content):
    """The tick's skip reason for a folder with this sidecar, checking a good folder beside it registered."""
    bad = copy_plate(inbox, "plate-1", age_seconds=QUIET * 2)
    if isinstance(content, str):
        (bad / sidecar_name).write_text(content)
    else:
        content(bad / sidecar_name)  # makes the sidecar otherwise (a symbolic link)
    settled(bad)
    good = copy_plate(inbox, "plate-2", age_seconds=QUIET * 2, sidecar="experiment_name: good\n")
    tick(instance, inbox)
    (entity,) = EntityStore().list("image_directory")
    assert entity.properties["image_directory"] == str(good)
    shutil.rmtree(good)
    reason = tick(instance, inbox).skip_reason.skip_message
    assert "\n" not in reason and reason.startswith(f"not registered: {bad / sidecar_name}: ")
    return reason.removeprefix(f"not registered: {bad / sidecar_name}: ")


def test_a_yaml_alias_bomb_is_refused_at_its_first_alias(instance, data):
    started = time.perf_counter()
    reason = refused_beside_a_good_folder(instance, data / "inbox", "experiment.yaml", ALIAS_BOMB)
    assert reason == "not valid YAML: YAML aliases (*name) are not allowed (line 2)"
    assert time.perf_counter() - started < 30  # two ticks; expanding the bomb took minutes


def test_a_yaml_anchor_without_alias_is_read(tmp_path):
    (tmp_path / "experiment.yaml").write_text("experiment_name: &name TNF\n")
    assert read_sidecar(tmp_path) == {"experiment_name": "TNF"}


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("experiment.yaml", "#" * MAX_SIDECAR_BYTES + "\n", "larger than 65536 bytes, the most a sidecar may hold"),
        ("experiment.json", "[" * 60_000, "not valid JSON: nested too deeply"),
        ("experiment.yaml", "[" * 60_000, "not valid YAML: nested too deeply"),
    ],
)
def test_an_oversized_or_too_deep_sidecar_is_refused(instance, data, name, content, reason):
    assert refused_beside_a_good_folder(instance, data / "inbox", name, content) == reason


def test_a_sidecar_linked_out_of_the_data_roots_is_not_read(instance, data, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("experiment_name: secret\n")
    settled(secret)
    reason = refused_beside_a_good_folder(
        instance, data / "inbox", "experiment.yaml", lambda sidecar: sidecar.symlink_to(secret))
    assert reason == f"sidecar {secret} is outside the data roots (MANTLE_DATA_ROOTS={data})"


def test_without_roots_a_sidecar_linked_to_a_system_file_is_not_read(instance, tmp_path, monkeypatch):
    monkeypatch.delenv("MANTLE_DATA_ROOTS", raising=False)
    (tmp_path / "inbox").mkdir()
    reason = refused_beside_a_good_folder(
        instance, tmp_path / "inbox", "experiment.yaml", lambda sidecar: sidecar.symlink_to("/etc/passwd"))
    assert reason == "sidecar /etc/passwd is in a system directory; set MANTLE_DATA_ROOTS to the folders that hold " \
        "your data"


def test_a_sidecar_model_path_out_of_the_data_roots_is_refused(instance, data, weights):
    given = f"{data}/inbox/../../outside/model"
    reason = refused_beside_a_good_folder(
        instance, data / "inbox", "experiment.yaml", f"segmentation_defaults: {{cellpose_model: '{given}'}}\n")
    assert reason == (
        f"segmentation_defaults: cellpose_model {weights} is outside the data roots (MANTLE_DATA_ROOTS={data})")


def test_a_sidecar_model_file_that_holds_no_weights_is_refused(instance, data):
    (data / "model.pt").write_text("root:SECRET-HASH:19000::::::\n")
    reason = refused_beside_a_good_folder(
        instance, data / "inbox", "experiment.yaml", f"segmentation_defaults: {{cellpose_model: {data}/model.pt}}\n")
    assert reason == f"segmentation_defaults: cellpose_model {data}/model.pt is not a Cellpose model file: " \
        "not a PyTorch file"


def test_a_sidecar_model_file_inside_the_roots_is_recorded(instance, data, weights):
    shutil.copyfile(weights, data / "lab model")
    copy_plate(data / "inbox", "plate", age_seconds=QUIET * 2,
               sidecar=f"segmentation_defaults: {{cellpose_model: {data}/lab model}}\n")
    tick(instance, data / "inbox")
    (entity,) = EntityStore().list("image_directory")
    assert entity.properties["segmentation_defaults"] == {"cellpose_model": f"{data}/lab model"}
