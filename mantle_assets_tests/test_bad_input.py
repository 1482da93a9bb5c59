"""Bad input battery (issue 7, item 1): every case fails with one line naming the file or parameter.

The cases go through the public entry points, ``register_image_directory`` and
``prepare_segmentation``, with a real entity store in the test's $MANTLE_HOME.
After each refusal nothing is recorded and no mask directory exists. Nothing
here loads a network; only the unknown-model case imports Cellpose (and torch),
to list its built-in names.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mantle_assets.entities import EntityStore
from mantle_assets.imaging.fields import ImageDirectoryError
from mantle_assets.imaging.io import MAX_FIELD_PIXELS
from mantle_assets.imaging.segmentation import ParameterError
from mantle_assets.orchestration.assets import prepare_segmentation
from mantle_assets.orchestration.config import SegmentationConfig
from mantle_assets.registration import register_image_directory
from mantle_assets.settings import OutsideDataRootsError

WELLS = ("01-A-01", "02-A-02")
SHAPE = (16, 16)


def write_plate(directory: Path, wells=WELLS, shape=SHAPE) -> Path:
    """A two-channel BBBC014-style plate: ``Channel{1,2}-<well>.tif``."""
    directory.mkdir(parents=True, exist_ok=True)
    for well in wells:
        for channel in (1, 2):
            pixels = (np.arange(np.prod(shape)).reshape(shape) * channel % 251).astype(np.uint8)
            tifffile.imwrite(directory / f"Channel{channel}-{well}.tif", pixels)
    return directory


def masks_dir(mantle_home: Path) -> Path:
    return mantle_home / "masks"


def refused_registration(mantle_home: Path, directory: Path, error=ImageDirectoryError) -> str:
    """Register ``directory``, expect a refusal, check nothing was written; return the message."""
    store = EntityStore()
    with pytest.raises(error) as info:
        register_image_directory(store, directory, "bad input")
    message = str(info.value)
    assert "\n" not in message
    assert EntityStore().list() == []
    assert not masks_dir(mantle_home).exists()
    return message


def refused_preparation(entity_id: str, config: SegmentationConfig, mantle_home: Path, error) -> str:
    """Prepare a segmentation, expect a refusal, check the store is unchanged; return the message."""
    store = EntityStore()
    before = store.list()
    history = [store.history(e.entity_id) for e in before]
    with pytest.raises(error) as info:
        prepare_segmentation(store, entity_id, config)
    message = str(info.value)
    assert "\n" not in message
    assert EntityStore().list() == before
    assert [EntityStore().history(e.entity_id) for e in before] == history
    assert not masks_dir(mantle_home).exists()
    return message


@pytest.fixture
def plate(tmp_path) -> Path:
    return write_plate(tmp_path / "plate")


@pytest.fixture
def registered(plate) -> str:
    return register_image_directory(EntityStore(), plate, "bad input").entity_id


# --------------------------------------------------------------------------- directories


def test_missing_directory(tmp_path, mantle_home):
    missing = tmp_path / "no such plate"
    message = refused_registration(mantle_home, missing)
    assert message == f"image directory {missing} does not exist"


def test_empty_directory(tmp_path, mantle_home):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = refused_registration(mantle_home, empty)
    assert message.startswith(f"no images in {empty}:")


def test_directory_of_non_images(tmp_path, mantle_home):
    directory = tmp_path / "notes"
    directory.mkdir()
    (directory / "readme.txt").write_text("plate notes")
    (directory / "layout.csv").write_text("well,compound\nA01,DMSO\n")
    (directory / "Channel1-01-A-01.tif.md5").write_text("0" * 32)
    message = refused_registration(mantle_home, directory)
    assert message.startswith(f"no images in {directory}:")


# --------------------------------------------------------------------------- broken files among good ones


def test_zero_byte_tiff_among_good_ones(mantle_home, plate):
    bad = plate / "Channel2-02-A-02.tif"
    bad.write_bytes(b"")
    message = refused_registration(mantle_home, plate)
    assert message == f"cannot read image {bad}: the file is empty"


@pytest.mark.parametrize(
    "content",
    [b"this is not an image at all", b"II*\x00" + b"\xff" * 20, b"MM\x00*\x00\x00\x00\x08" + b"\x00" * 4],
    ids=["text", "bad-ifd-offset", "empty-ifd"],
)
def test_corrupt_tiff_among_good_ones(mantle_home, plate, content):
    bad = plate / "Channel1-02-A-02.tif"
    bad.write_bytes(content)
    message = refused_registration(mantle_home, plate)
    assert message.startswith(f"cannot read image {bad}: ")


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_truncated_tiff_among_good_ones(mantle_home, plate, keep):
    bad = plate / "Channel2-01-A-01.tif"
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    message = refused_registration(mantle_home, plate)
    assert message.startswith(f"cannot read image {bad}: ")


@pytest.mark.parametrize(
    "kwargs",
    [{"photometric": "minisblack"}, {"imagej": True}, {"ome": True, "photometric": "minisblack"}],
    ids=["tifffile", "imagej", "ome"],
)
@pytest.mark.parametrize("keep", [0.7, 0.3])  # OME keeps its XML last: a 0.9 cut loses only that
def test_truncated_multi_channel_tiff(tmp_path, mantle_home, kwargs, keep):
    # tifffile itself only logs a page past the end and reads the planes before it.
    directory = tmp_path / "stacks"
    directory.mkdir()
    tifffile.imwrite(directory / "a.tif", np.ones((3, 32, 32), np.uint16), **kwargs)
    tifffile.imwrite(directory / "b.tif", np.ones((3, 32, 32), np.uint16), **kwargs)
    bad = directory / "a.tif"
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    message = refused_registration(mantle_home, directory)
    assert re.fullmatch(rf"cannot read image {re.escape(str(bad))}: the file is truncated \(.*\)", message)


# --------------------------------------------------------------------------- pixel types and layouts


@pytest.mark.parametrize(("dtype", "shown"), [(np.float64, "float64"), (np.int32, "int32"), (bool, "bool")])
def test_unsupported_pixel_type(mantle_home, plate, dtype, shown):
    bad = plate / "Channel1-01-A-01.tif"
    tifffile.imwrite(bad, np.ones(SHAPE, dtype))
    message = refused_registration(mantle_home, plate)
    assert message.startswith(f"{bad}: unsupported pixel type {shown}")
    assert message.endswith("expected uint8, uint16 or float32")


@pytest.mark.parametrize(
    ("stack", "kwargs"),
    [
        (np.zeros((20, 32, 32), np.uint16), {}),
        (np.zeros((3, 32, 32), np.uint16), {"imagej": True, "metadata": {"axes": "ZYX"}}),
        (np.zeros((4, 2, 32, 32), np.uint16), {"photometric": "minisblack"}),
    ],
    ids=["z-stack", "imagej-z-stack", "4-d"],
)
def test_stack_is_refused(tmp_path, mantle_home, stack, kwargs):
    directory = tmp_path / "stacks"
    directory.mkdir()
    tifffile.imwrite(directory / "good.tif", np.zeros((32, 32), np.uint16))
    bad = directory / "stack.tif"
    tifffile.imwrite(bad, stack, **kwargs)
    message = refused_registration(mantle_home, directory)
    assert message.startswith(f"{bad}: ")
    assert "3-D stack" in message or "dimensions" in message


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_mixed_rgb_and_grey(tmp_path, mantle_home, suffix):
    directory = tmp_path / "mixed"
    directory.mkdir()
    rgb = np.zeros((*SHAPE, 3), np.uint8)
    rgb[..., 0] = 200
    if suffix == ".tif":
        tifffile.imwrite(directory / "a.tif", rgb, photometric="rgb")
        tifffile.imwrite(directory / "b.tif", np.zeros(SHAPE, np.uint8))
    else:
        Image.fromarray(rgb).save(directory / "a.png")
        Image.fromarray(np.zeros(SHAPE, np.uint8)).save(directory / "b.png")
    message = refused_registration(mantle_home, directory)
    assert message == f"{directory}: mixed channel counts: a{suffix} has 3 channel(s) but b{suffix} has 1"


def test_per_channel_files_missing_for_some_fields(mantle_home, plate):
    write_plate(plate, wells=("03-A-03", "04-A-04"))
    (plate / "Channel2-03-A-03.tif").unlink()
    (plate / "Channel1-04-A-04.tif").unlink()
    message = refused_registration(mantle_home, plate)
    assert message.startswith(f"{plate}: field 03-A-03 has no Channel2 file, though Channel2-")


# --------------------------------------------------------------------------- images too large for one piece


def test_default_pixel_limit_is_documented():
    from mantle_assets.imaging import io

    assert MAX_FIELD_PIXELS == 2**28
    assert "MANTLE_MAX_FIELD_PIXELS" in io.__doc__ and "2**28" in io.__doc__


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_image_over_the_pixel_limit_is_refused(tmp_path, mantle_home, monkeypatch, suffix):
    directory = tmp_path / "big"
    directory.mkdir()
    tifffile.imwrite(directory / "small.tif", np.zeros((8, 9), np.uint8))  # 72 pixels: allowed
    big = directory / f"big{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(big, np.zeros((9, 9), np.uint16))
    else:
        Image.fromarray(np.zeros((9, 9), np.uint8)).save(big)
    monkeypatch.setenv("MANTLE_MAX_FIELD_PIXELS", "72")
    message = refused_registration(mantle_home, directory)
    assert message == (
        f"{big}: 9x9 = 81 pixels per channel exceeds the limit of 72 (MANTLE_MAX_FIELD_PIXELS); "
        "split the image into tiles"
    )


def test_pixel_limit_is_per_channel_plane(tmp_path, mantle_home, monkeypatch):
    directory = tmp_path / "channels"
    directory.mkdir()
    tifffile.imwrite(directory / "a.tif", np.zeros((3, 8, 8), np.uint16), photometric="minisblack")
    monkeypatch.setenv("MANTLE_MAX_FIELD_PIXELS", "64")
    entity = register_image_directory(EntityStore(), directory)
    assert entity.properties["field_grouping"]["n_channels"] == 3
    monkeypatch.setenv("MANTLE_MAX_FIELD_PIXELS", "63")
    with pytest.raises(ImageDirectoryError, match=r"a\.tif: 8x8 = 64 pixels per channel exceeds the limit of 63"):
        register_image_directory(EntityStore(), directory, again=True)
    assert [e.entity_id for e in EntityStore().list()] == [entity.entity_id]


def test_image_grown_over_the_limit_after_registration(registered, plate, mantle_home, monkeypatch):
    monkeypatch.setenv("MANTLE_MAX_FIELD_PIXELS", str(SHAPE[0] * SHAPE[1] - 1))
    message = refused_preparation(registered, SegmentationConfig(), mantle_home, ImageDirectoryError)
    assert message.startswith(f"{registered}: {plate / 'Channel1-01-A-01.tif'}: 16x16 = 256 pixels per channel")


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5"])
def test_bad_pixel_limit_setting(mantle_home, plate, monkeypatch, value):
    monkeypatch.setenv("MANTLE_MAX_FIELD_PIXELS", value)
    message = refused_registration(mantle_home, plate, ValueError)  # a bad setting, not a bad image
    assert message == f"MANTLE_MAX_FIELD_PIXELS must be a positive whole number, got {value!r}"


def test_image_over_the_memory_budget_is_refused_from_its_header(tmp_path, mantle_home, monkeypatch):
    # A 4096 x 4096 zlib TIFF of zeros is 53 KB on disk and inside the pixel limit; decoded it is 32 MiB, and
    # reading and preparing it 160 MiB. (16384 x 16384, 277 KB, drove a run to 20.6 GiB.)
    directory = tmp_path / "bomb"
    directory.mkdir()
    bomb = directory / "zeros.tif"
    tifffile.imwrite(bomb, np.zeros((4096, 4096), np.uint16), compression="zlib")
    assert bomb.stat().st_size < 100_000
    monkeypatch.setenv("MANTLE_MAX_IMAGE_BYTES", str(100 * 2**20))
    message = refused_registration(mantle_home, directory)
    assert message == (
        f"{bomb}: 4096x4096 x 1 channel(s) of uint16 takes 128.0 MiB to read and prepare, more than the memory "
        "budget of 100.0 MiB (MANTLE_MAX_IMAGE_BYTES); split the image into tiles"
    )
    monkeypatch.setenv("MANTLE_MAX_IMAGE_BYTES", str(128 * 2**20))
    register_image_directory(EntityStore(), directory)


def test_memory_budget_defaults_to_half_the_machine(monkeypatch):
    from mantle_assets.settings import machine_memory, max_image_bytes

    monkeypatch.delenv("MANTLE_MAX_IMAGE_BYTES", raising=False)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < machine_memory() <= physical
    assert max_image_bytes() == machine_memory() // 2


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5"])
def test_bad_memory_budget_setting(mantle_home, plate, monkeypatch, value):
    monkeypatch.setenv("MANTLE_MAX_IMAGE_BYTES", value)
    message = refused_registration(mantle_home, plate, ValueError)
    assert message == f"MANTLE_MAX_IMAGE_BYTES must be a positive integer, not {value!r}"


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (7, 40), (40, 7)])
def test_image_too_small_for_cellpose(tmp_path, mantle_home, shape):
    directory = write_plate(tmp_path / "plate")
    tiny = directory / "tiny.tif"
    tifffile.imwrite(tiny, np.ones(shape, np.uint8))
    for path in directory.glob("Channel*"):
        path.unlink()
    message = refused_registration(mantle_home, directory)
    assert message == f"{tiny}: a {shape[0]}x{shape[1]} image; images must be at least 8 pixels a side"


def test_file_name_too_long_for_its_mask_is_refused_at_registration(tmp_path, mantle_home):
    directory = tmp_path / "long"
    directory.mkdir()
    name = "a" * 246 + ".tif"  # a valid file name (250 bytes), but <field>_cp_masks.tif would be 259
    tifffile.imwrite(directory / name, np.ones(SHAPE, np.uint8))
    message = refused_registration(mantle_home, directory)
    assert message.startswith(f"{directory}: {name} gives field {'a' * 40}..., whose mask file name")
    assert message.endswith("would be 259 bytes, over the 255 file systems allow; shorten the file name")


def test_folder_and_file_names_too_long_together(tmp_path, mantle_home):
    # Each name is short enough, but a sub-folder's name becomes part of its files' field names.
    directory = tmp_path / "long"
    folder = directory / ("w" * 125)
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / ("f" * 125 + ".tif"), np.ones(SHAPE, np.uint8))
    message = refused_registration(mantle_home, directory)
    assert message.startswith(f"{directory}: {'w' * 125}/{'f' * 125}.tif gives field {'w' * 40}...")
    assert "would be 264 bytes" in message


def test_symbolic_link_loop_as_the_directory(tmp_path, mantle_home):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    message = refused_registration(mantle_home, loop)
    assert message == f"image directory {loop}: a symbolic link loop"


def link_loop(directory: Path) -> None:
    (directory / "a.tif").symlink_to(directory / "b.tif")
    (directory / "b.tif").symlink_to(directory / "a.tif")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (link_loop, "a symbolic link loop"),
        (lambda directory: (directory / "a.tif").symlink_to(directory / "gone.tif"), "a symbolic link to nothing"),
        (lambda directory: os.mkfifo(directory / "a.tif"), "not a regular file"),
    ],
    ids=["loop", "dangling", "fifo"],
)
def test_image_file_that_cannot_be_opened_is_named_not_left_out(mantle_home, plate, make, reason):
    # These were left out of the grouping without a word: a missing field.
    make(plate)
    message = refused_registration(mantle_home, plate)
    assert message == f"cannot read image {plate / 'a.tif'}: {reason}"


def test_non_finite_pixels_are_refused_when_measured(tmp_path, mantle_home):
    from mantle_assets.imaging.fields import group_fields
    from mantle_assets.imaging.io import write_label_image
    from mantle_assets.imaging.measurements import measure_directory

    directory = tmp_path / "float plate"
    directory.mkdir()
    pixels = np.ones(SHAPE, np.float32)
    pixels[3, 3] = np.nan
    tifffile.imwrite(directory / "01-A-01.tif", pixels)
    masks = tmp_path / "masks"
    masks.mkdir()
    write_label_image(masks / "01-A-01_cp_masks.tif", np.ones(SHAPE, np.uint16))
    register_image_directory(EntityStore(), directory)  # headers only: admitted
    grouping = group_fields(directory)
    with pytest.raises(ImageDirectoryError) as info:
        measure_directory(grouping, masks, ["DNA"])
    assert str(info.value) == (
        f"{directory / '01-A-01.tif'}: 1 of 256 pixel values are NaN or infinite; replace them (e.g. with 0) "
        "before registering the images"
    )


def test_text_file_named_tif_is_refused_without_quoting_it(tmp_path, mantle_home):
    # tifffile's message was "not a TIFF file: header=b'root'", the start of the file linked to.
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    directory = tmp_path / "plate"
    directory.mkdir()
    tifffile.imwrite(directory / "good.tif", np.ones(SHAPE, np.uint8))
    (directory / "x.tif").symlink_to(secret)
    message = refused_registration(mantle_home, directory)
    assert message == f"cannot read image {directory / 'x.tif'}: not a TIFF file"


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("parameters", "name", "expected"),
    [
        ({"nuclei_channel": 3}, "nuclei_channel", "nuclei_channel=3 but the images have 2 channel(s)"),
        (
            {"cytoplasm_channel": 3, "nuclei_channel": 1},
            "cytoplasm_channel",
            "cytoplasm_channel=3 but the images have 2 channel(s)",
        ),
        ({"nuclei_channel": 4}, "nuclei_channel", "nuclei_channel=4 but the images have 2 channel(s)"),
        (
            {"cytoplasm_channel": -1},
            "cytoplasm_channel",
            "cytoplasm_channel must be a channel number (0, or c >= 1 for the c-th channel of a field), got -1",
        ),
    ],
)
def test_channel_beyond_the_images(registered, mantle_home, parameters, name, expected):
    message = refused_preparation(registered, SegmentationConfig(**parameters), mantle_home, ParameterError)
    assert message == expected and message.startswith(name)


@pytest.mark.parametrize(("nuclei", "cytoplasm"), [(2, 1), (1, 0), (0, 2)])
def test_whole_cell_request_to_the_bundled_nuclei_model(registered, mantle_home, nuclei, cytoplasm):
    config = SegmentationConfig(cellpose_model="mantle-nuclei-v1", nuclei_channel=nuclei, cytoplasm_channel=cytoplasm)
    message = refused_preparation(registered, config, mantle_home, ParameterError)
    assert message.startswith(
        f"cellpose_model 'mantle-nuclei-v1' segments nuclei in one channel, but cytoplasm_channel={cytoplasm} "
        f"differs from nuclei_channel={nuclei} (a whole-cell request): ")
    assert "cyto3" in message


def test_whole_cell_request_to_cellpose_nuclei(registered, mantle_home, tmp_path, monkeypatch):
    from cellpose import models as cellpose_models

    # Cellpose's cache holding a nuclei weights file: the request is refused before anything loads it.
    cache = tmp_path / "cellpose cache"
    cache.mkdir()
    (cache / "nucleitorch_0").write_bytes(b"weights")
    monkeypatch.setattr(cellpose_models, "MODEL_DIR", cache)
    config = SegmentationConfig(cellpose_model="nuclei", nuclei_channel=2, cytoplasm_channel=1)
    message = refused_preparation(registered, config, mantle_home, ParameterError)
    assert message.startswith("cellpose_model 'nuclei' segments nuclei in one channel, but cytoplasm_channel=1")


def test_a_model_file_of_unknown_kind_may_be_asked_for_whole_cells(registered, tmp_path, bundled_model_name):
    from mantle_assets.models.registry import resolve_model

    weights = tmp_path / "my model"
    shutil.copyfile(resolve_model(bundled_model_name).path, weights)
    config = SegmentationConfig(cellpose_model=str(weights), nuclei_channel=2, cytoplasm_channel=1)
    _, _, _, spec = prepare_segmentation(EntityStore(), registered, config)
    assert spec.kind == "file"


@pytest.mark.parametrize("diameter", ["-5", "0", "0.0", "NaN", "nan", "inf", "-inf", "abc", "12px", "none please"])
def test_bad_diameter(registered, mantle_home, diameter):
    message = refused_preparation(registered, SegmentationConfig(diameter=diameter), mantle_home, ParameterError)
    assert message.startswith("diameter must be ")
    assert repr(diameter) in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("batch_size", 0, "a whole number >= 1 (tiles per network pass)"),
        ("batch_size", -3, "a whole number >= 1 (tiles per network pass)"),
        ("flow_threshold", math.nan, "a finite number >= 0 (0 turns the flow check off)"),
        ("flow_threshold", math.inf, "a finite number >= 0 (0 turns the flow check off)"),
        ("flow_threshold", -0.1, "a finite number >= 0 (0 turns the flow check off)"),
        ("cellprob_threshold", math.nan, "a finite number"),
        ("cellprob_threshold", -math.inf, "a finite number"),
        ("min_size", -1, "a whole number >= 0 (0 keeps every object)"),
    ],
)
def test_impossible_cellpose_option(registered, mantle_home, name, value, expected):
    # Each ran a whole segmentation before: batch_size -3 gave 0 objects, NaN thresholds failed at recording.
    message = refused_preparation(registered, SegmentationConfig(**{name: value}), mantle_home, ParameterError)
    assert message == f"{name} must be {expected}, got {value!r}"


def test_impossible_cellpose_option_from_the_command_line(registered, mantle_home):
    from mantle_assets.orchestration.config import coerce_segmentation_parameters

    given = coerce_segmentation_parameters({"batch_size": "-3"})
    message = refused_preparation(registered, SegmentationConfig(**given), mantle_home, ParameterError)
    assert message == "batch_size must be a whole number >= 1 (tiles per network pass), got -3"


def test_unknown_model_name():
    # resolve_model is what prepare_segmentation calls last; for a name that is
    # no bundled model it imports cellpose.models (and so torch) to list the
    # built-in names, but it loads no network.
    from mantle_assets.models.registry import ModelResolutionError, resolve_model

    with pytest.raises(ModelResolutionError) as info:
        resolve_model("cyto42", download=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("unknown cellpose_model 'cyto42': ")
    assert "mantle-nuclei-v1" in message and "nuclei" in message


def test_unknown_entity(registered, mantle_home):
    message = refused_preparation("E999999", SegmentationConfig(), mantle_home, KeyError)
    assert message == "no entity E999999"


# --------------------------------------------------------------------------- changed after registration


def test_directory_deleted_after_registration(registered, plate, mantle_home):
    shutil.rmtree(plate)
    message = refused_preparation(registered, SegmentationConfig(), mantle_home, ImageDirectoryError)
    assert message == f"{registered}: image directory {plate} does not exist"


def test_directory_changed_so_it_no_longer_groups(registered, plate, mantle_home):
    (plate / "Channel2-02-A-02.tif").unlink()
    message = refused_preparation(registered, SegmentationConfig(), mantle_home, ImageDirectoryError)
    assert message.startswith(f"{registered}: {plate}: field 02-A-02 has no Channel2 file, though Channel2-")


def test_file_corrupted_after_registration(registered, plate, mantle_home):
    bad = plate / "Channel1-01-A-01.tif"
    bad.write_bytes(bad.read_bytes()[:100])
    message = refused_preparation(registered, SegmentationConfig(), mantle_home, ImageDirectoryError)
    assert message.startswith(f"{registered}: cannot read image {bad}: ")


def test_directory_replaced_by_a_file_after_registration(registered, plate, mantle_home):
    shutil.rmtree(plate)
    plate.write_text("not a directory")
    message = refused_preparation(registered, SegmentationConfig(), mantle_home, ImageDirectoryError)
    assert message == f"{registered}: {plate} is not a directory"


# --------------------------------------------------------------------------- awkward but valid paths


@pytest.mark.parametrize(
    "name",
    ["plate with spaces", "Platte Zürich — été 2024", "プレート 1", "emoji 🧫 plate"],
)
def test_spaces_and_non_ascii_paths_register_and_prepare(tmp_path, monkeypatch, name):
    home = tmp_path / f"home {name}"
    monkeypatch.setenv("MANTLE_HOME", str(home))
    directory = write_plate(tmp_path / name / f"sub {name}", wells=(f"01-A-01 {name}", "02-A-02"))
    store = EntityStore()
    entity = register_image_directory(store, directory, f"experiment {name}")
    assert entity.name == f"sub {name}"
    assert entity.properties["image_directory"] == str(directory)
    assert entity.properties["experiment_name"] == f"experiment {name}"
    assert EntityStore().get(entity.entity_id) == entity  # round trip through DuckDB

    source, grouping, settings, spec = prepare_segmentation(
        EntityStore(), entity.entity_id, SegmentationConfig(nuclei_channel=2, cytoplasm_channel=2, diameter="17")
    )
    assert source == entity
    assert grouping.directory == directory
    assert [f.name for f in grouping.fields] == [f"01-A-01 {name}", "02-A-02"]
    assert grouping.fields[0].files[0] == directory / f"Channel1-01-A-01 {name}.tif"
    assert settings.diameter == 17.0
    assert (spec.name, spec.kind) == ("mantle-nuclei-v1", "bundled")
    assert not (home / "masks").exists()


def test_good_plate_prepares(registered, plate, mantle_home):
    """The control for every refusal above: the same plate and defaults pass."""
    source, grouping, settings, spec = prepare_segmentation(EntityStore(), registered, SegmentationConfig())
    assert source.entity_id == registered
    assert (grouping.directory, grouping.n_channels, len(grouping.fields)) == (plate, 2, 2)
    assert settings.diameter is None
    assert spec.kind == "bundled"
    assert not masks_dir(mantle_home).exists()


def test_system_directory_is_refused(mantle_home, monkeypatch):
    monkeypatch.delenv("MANTLE_DATA_ROOTS", raising=False)
    message = refused_registration(mantle_home, Path("/etc"), OutsideDataRootsError)
    assert message.startswith("image_directory /etc is in a system directory")


def test_image_linked_from_outside_the_data_roots_is_refused(tmp_path, mantle_home, monkeypatch):
    outside = write_plate(tmp_path / "outside")
    plate = write_plate(tmp_path / "data" / "plate", wells=WELLS[:1])
    (plate / f"Channel1-{WELLS[1]}.tif").symlink_to(outside / f"Channel1-{WELLS[1]}.tif")
    (plate / f"Channel2-{WELLS[1]}.tif").symlink_to(outside / f"Channel2-{WELLS[1]}.tif")
    monkeypatch.setenv("MANTLE_DATA_ROOTS", str(tmp_path / "data"))
    message = refused_registration(mantle_home, plate, OutsideDataRootsError)
    assert message.startswith("image file ") and "outside the data roots" in message
