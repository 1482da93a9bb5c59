"""Tests of data types and property validation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mantle_assets.entities import (
    DATA_TYPES,
    DataType,
    PropertySpec,
    PropertyValidationError,
    UnknownDataTypeError,
    get_data_type,
)


def _mask_properties(tmp_path: Path, **overrides):
    masks = tmp_path / "masks"
    masks.mkdir(exist_ok=True)
    properties = {
        "mask_directory": masks,
        "source_entity": "E000001",
        "cellpose_model": "cyto3",
        "nuclei_channel": 0,
        "cytoplasm_channel": 1,
        "diameter": "None",
    }
    properties.update(overrides)
    return properties


def _assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_registry_has_the_six_types():
    assert set(DATA_TYPES) == {
        "image_directory",
        "segmentation_mask_directory",
        "cellpose_model",
        "annotated_image_directory",
        "cell_measurement_table",
        "assay_readout",
    }
    for name, data_type in DATA_TYPES.items():
        assert data_type.name == name
        assert data_type.description
    assert get_data_type("image_directory") is DATA_TYPES["image_directory"]


def test_required_properties_match_the_spec():
    required = {name: {p for p, s in t.properties.items() if s.required} for name, t in DATA_TYPES.items()}
    assert required == {
        "image_directory": {"image_directory"},
        "segmentation_mask_directory": {
            "mask_directory",
            "source_entity",
            "cellpose_model",
            "nuclei_channel",
            "cytoplasm_channel",
            "diameter",
        },
        "cellpose_model": {"model_file"},
        "annotated_image_directory": {"annotated_directory"},
        "cell_measurement_table": {"measurement_file", "mask_entity", "source_entity"},
        "assay_readout": {"readout_directory", "measurement_entity", "readout"},
    }


def test_unknown_data_type_lists_known_names():
    with pytest.raises(UnknownDataTypeError) as error:
        get_data_type("nope")
    _assert_one_line(error, "'nope'", "image_directory", "cellpose_model")
    assert isinstance(error.value, ValueError)


def test_validate_normalises_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    result = get_data_type("image_directory").validate(
        {
            "image_directory": "images",
            "file_count": 12,
            "field_grouping": {"fields": ("A01", "A02"), "channels": [0, 1]},
            "experiment_name": None,
        }
    )
    assert result == {
        "image_directory": (tmp_path / "images").resolve().as_posix(),
        "file_count": 12,
        "field_grouping": {"fields": ["A01", "A02"], "channels": [0, 1]},
    }
    assert Path(result["image_directory"]).is_absolute()


def test_float_accepts_int_and_integer_rejects_bool(tmp_path):
    data_type = get_data_type("segmentation_mask_directory")
    result = data_type.validate(_mask_properties(tmp_path, estimated_diameter=30))
    assert result["estimated_diameter"] == 30.0 and isinstance(result["estimated_diameter"], float)
    with pytest.raises(PropertyValidationError) as error:
        data_type.validate(_mask_properties(tmp_path, fields=True))
    _assert_one_line(error, "segmentation_mask_directory", "'fields'", "integer")
    with pytest.raises(PropertyValidationError):
        data_type.validate(_mask_properties(tmp_path, estimated_diameter=float("nan")))


def test_file_accepts_files_and_directories(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"x")
    data_type = get_data_type("cellpose_model")
    assert data_type.validate({"model_file": weights})["model_file"] == weights.as_posix()
    assert data_type.validate({"model_file": tmp_path})["model_file"] == tmp_path.as_posix()
    with pytest.raises(PropertyValidationError) as error:
        data_type.validate({"model_file": tmp_path / "missing.pt"})
    _assert_one_line(error, "cellpose_model", "'model_file'", "missing.pt")


@pytest.mark.parametrize(
    ("data_type", "properties", "fragments"),
    [
        ("image_directory", {}, ["image_directory: property 'image_directory' is required"]),
        ("image_directory", {"image_directory": "{dir}", "colour": "red"}, ["image_directory", "'colour'"]),
        (
            "segmentation_mask_directory",
            {"total_cells": "x"},
            ["segmentation_mask_directory: property 'total_cells' must be integer, got str 'x'"],
        ),
        ("image_directory", {"image_directory": "{dir}/absent"}, ["image_directory", "'image_directory'", "absent"]),
        ("image_directory", {"image_directory": "{dir}/file.txt"}, ["'image_directory'", "not a directory"]),
        ("segmentation_mask_directory", {"source_entity": "42"}, ["'source_entity'", "entity id"]),
        ("image_directory", {"image_directory": "{dir}", "channel_names": {1, 2}}, ["'channel_names'", "JSON"]),
        ("image_directory", {"image_directory": "{dir}", "experiment_name": 3}, ["'experiment_name'", "string"]),
        ("image_directory", {"image_directory": None}, ["'image_directory'", "required"]),
    ],
)
def test_invalid_properties_raise_one_line_errors(tmp_path, data_type, properties, fragments):
    (tmp_path / "file.txt").write_text("x")
    filled = {k: v.format(dir=tmp_path) if isinstance(v, str) else v for k, v in properties.items()}
    if data_type == "segmentation_mask_directory":
        filled = _mask_properties(tmp_path, **filled)
    with pytest.raises(PropertyValidationError) as error:
        get_data_type(data_type).validate(filled)
    _assert_one_line(error, *fragments)
    assert isinstance(error.value, ValueError)


def test_partial_allows_missing_required_but_not_none(tmp_path):
    data_type = get_data_type("segmentation_mask_directory")
    assert data_type.validate({"total_cells": 5}, partial=True) == {"total_cells": 5}
    with pytest.raises(PropertyValidationError):
        data_type.validate({"cellpose_model": None}, partial=True)


def test_long_values_are_shortened_in_messages():
    with pytest.raises(PropertyValidationError) as error:
        get_data_type("annotated_image_directory").validate({"n_images": "a\n" * 200}, partial=True)
    assert "\n" not in str(error.value)
    assert len(str(error.value)) < 200


def test_huge_values_are_described_without_writing_them_out():
    # What a YAML alias bomb reads as: 10**30 strings in lists shared 30 levels deep. Its repr would never end.
    bomb = ["lol"]
    for _ in range(30):
        bomb = [bomb] * 10
    started = time.perf_counter()
    for value in (bomb, {"x": bomb}, "a" * 10**8):
        with pytest.raises(PropertyValidationError) as error:
            get_data_type("annotated_image_directory").validate({"n_images": value}, partial=True)
        assert "\n" not in str(error.value) and len(str(error.value)) < 200
    assert time.perf_counter() - started < 1
    assert "got str 'aaaaaaaaaa" in str(error.value)


def test_a_new_type_is_one_entry(tmp_path):
    data_type = DataType(
        name="table",
        description="A CSV table.",
        properties={"path": PropertySpec("file", required=True), "rows": PropertySpec("integer")},
    )
    table = tmp_path / "t.csv"
    table.write_text("a\n")
    assert data_type.validate({"path": table, "rows": 1}) == {"path": table.as_posix(), "rows": 1}
    with pytest.raises(TypeError):
        data_type.properties["x"] = PropertySpec("string")  # type: ignore[index]
    with pytest.raises(ValueError):
        PropertySpec("bytes")  # type: ignore[arg-type]
