"""Data types of entities and the validation of their properties.

A data type says which properties an entity may carry, which of them are
required and what kind of value each one holds. Adding a data type is one
``DataType(...)`` entry in ``_DATA_TYPE_DEFINITIONS`` below.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from mantle_assets.storage import is_uri, normalised_uri

__all__ = [
    "DATA_TYPES",
    "ENTITY_ID_PATTERN",
    "DataType",
    "PropertyKind",
    "PropertySpec",
    "PropertyValidationError",
    "UnknownDataTypeError",
    "get_data_type",
]

PropertyKind = Literal["file", "directory", "string", "integer", "float", "boolean", "json", "entity"]

_PROPERTY_KINDS: frozenset[str] = frozenset(
    ("file", "directory", "string", "integer", "float", "boolean", "json", "entity")
)

# Ids are zero-padded to six digits; more digits are accepted so that the
# millionth entity does not become unreferenceable.
ENTITY_ID_PATTERN = re.compile(r"E\d{6,}")

_REPR_LIMIT = 80
# reprlib stops at these sizes while it writes, so that describing a value of 10**9 items (what a YAML alias
# bomb expands to, shared nine levels deep) costs no more than describing a small one.
_BOUNDED_REPR = reprlib.Repr()
_BOUNDED_REPR.maxlevel = 3
_BOUNDED_REPR.maxstring = _BOUNDED_REPR.maxother = _BOUNDED_REPR.maxlong = _REPR_LIMIT


class PropertyValidationError(ValueError):
    """Properties that do not fit their data type; the message is one line
    naming the data type and the property."""


class UnknownDataTypeError(ValueError):
    """A data type name that is not in :data:`DATA_TYPES`."""


def _short_repr(value: Any) -> str:
    # Messages must stay on one line and readable, whatever the caller passed.
    text = " ".join(_BOUNDED_REPR.repr(value).split())
    if len(text) > _REPR_LIMIT:
        text = text[: _REPR_LIMIT - 3] + "..."
    return text


def _got(value: Any) -> str:
    return f"got {type(value).__name__} {_short_repr(value)}"


@dataclass(frozen=True)
class PropertySpec:
    """What one property of a data type holds.

    Parameters
    ----------
    kind : PropertyKind
        ``"file"`` (an existing file or directory), ``"directory"`` (an
        existing directory), ``"string"``, ``"integer"``, ``"float"``,
        ``"boolean"``, ``"json"`` (any JSON-serialisable value) or
        ``"entity"`` (an entity id such as ``E000042``).
    required : bool
        Whether every entity of the type must have the property.
    description : str
        What the property means, for people.
    """

    kind: PropertyKind
    required: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _PROPERTY_KINDS:
            raise ValueError(f"unknown property kind {self.kind!r}; expected one of {sorted(_PROPERTY_KINDS)}")


@dataclass(frozen=True)
class DataType:
    """A kind of entity and the properties it carries.

    Parameters
    ----------
    name : str
        The registry key, e.g. ``"image_directory"``.
    description : str
        What entities of this type are, for people.
    properties : Mapping[str, PropertySpec]
        The allowed properties by name.
    """

    name: str
    description: str
    properties: Mapping[str, PropertySpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only so that the shared registry cannot be altered by accident.
        object.__setattr__(self, "properties", MappingProxyType(dict(self.properties)))

    def validate(self, properties: Mapping[str, Any], *, partial: bool = False) -> dict[str, Any]:
        """Check properties against this type and return a normalised copy.

        Parameters
        ----------
        properties : Mapping[str, Any]
            Property values by name. ``None`` values of properties that are
            not required are allowed and left out of the result.
        partial : bool
            If true, required properties may be missing (for updates), but
            still may not be set to ``None``.

        Returns
        -------
        dict[str, Any]
            The values normalised: paths as absolute POSIX strings, URIs
            (``s3://...``) as :func:`~mantle_assets.storage.normalised_uri`, integers
            as ``int``, floats as ``float``, JSON values as they read back
            from JSON text.

        Raises
        ------
        PropertyValidationError
            For unknown or missing properties, values of the wrong type and
            local paths that do not exist.
        """
        if not isinstance(properties, Mapping):
            raise PropertyValidationError(f"{self.name}: properties must be a mapping, {_got(properties)}")
        result: dict[str, Any] = {}
        for prop, value in properties.items():
            spec = self.properties.get(prop) if isinstance(prop, str) else None
            if spec is None:
                known = ", ".join(sorted(self.properties))
                raise PropertyValidationError(f"{self.name}: unknown property {prop!r} (known: {known})")
            if value is None:
                if spec.required:
                    raise PropertyValidationError(f"{self.name}: property {prop!r} is required and cannot be None")
                continue
            result[prop] = self._normalise(prop, spec, value)
        if not partial:
            for prop, spec in self.properties.items():
                if spec.required and prop not in result:
                    raise PropertyValidationError(f"{self.name}: property {prop!r} is required")
        return result

    def _normalise(self, prop: str, spec: PropertySpec, value: Any) -> Any:
        def fail(expected: str) -> PropertyValidationError:
            return PropertyValidationError(f"{self.name}: property {prop!r} must be {expected}, {_got(value)}")

        kind = spec.kind
        if kind in ("file", "directory"):
            if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value.strip()):
                raise fail("a path")
            if is_uri(value):
                # Not looked up: that would cost a request to the object store on every
                # validation, and the writers have just listed or uploaded it.
                return normalised_uri(value)
            path = Path(os.path.abspath(os.path.expanduser(os.fspath(value))))
            if kind == "directory" and not path.is_dir():
                reason = "not a directory" if path.exists() else "not found"
                raise PropertyValidationError(
                    f"{self.name}: property {prop!r} must be an existing directory, "
                    f"got {_short_repr(path.as_posix())} ({reason})"
                )
            if kind == "file" and not path.exists():
                raise PropertyValidationError(
                    f"{self.name}: property {prop!r} must be an existing path, "
                    f"got {_short_repr(path.as_posix())} (not found)"
                )
            return path.as_posix()
        if kind == "string":
            if not isinstance(value, str):
                raise fail("string")
            return str(value)
        if kind == "integer":
            # bool is an int subclass, but True as a cell count is a bug.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise fail("integer")
            return int(value)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise fail("float")
            number = float(value)
            # JSON text (and DuckDB's JSON type) cannot hold NaN or infinity.
            if not math.isfinite(number):
                raise fail("a finite float")
            return number
        if kind == "boolean":
            if not isinstance(value, bool):
                raise fail("boolean")
            return value
        if kind == "json":
            try:
                # Round-tripping gives the value exactly as it will read back.
                return json.loads(json.dumps(value, allow_nan=False))
            except (TypeError, ValueError):
                raise fail("JSON-serialisable") from None
        if kind == "entity":
            if not isinstance(value, str) or not ENTITY_ID_PATTERN.fullmatch(value):
                raise fail("an entity id like E000042")
            return value
        raise AssertionError(f"unhandled property kind {kind!r}")  # pragma: no cover


_DATA_TYPE_DEFINITIONS: tuple[DataType, ...] = (
    DataType(
        name="image_directory",
        description="A folder of microscopy images (TIFF, PNG, JPEG or BMP).",
        properties={
            "image_directory": PropertySpec("directory", True, "The folder of TIFF/PNG/JPEG/BMP images."),
            "experiment_name": PropertySpec("string", description="Name of the experiment the images belong to."),
            "field_grouping": PropertySpec(
                "json", description="File-name pattern, fields and channels found at registration."
            ),
            "file_count": PropertySpec("integer", description="Number of image files at registration."),
            "fingerprint": PropertySpec("string", description="Digest of file names and sizes, to detect changes."),
            "channel_names": PropertySpec(
                "json", description="Names of the channels in channel order (e.g. [\"NFkB\", \"DNA\"])."
            ),
            "plate_layout": PropertySpec(
                "file", description="CSV of the plate: well -> treatment, dose and control flag (-1/0/1)."
            ),
            "segmentation_defaults": PropertySpec("json", description="Default segmentation parameters."),
        },
    ),
    DataType(
        name="segmentation_mask_directory",
        description="Label masks computed from an image directory: Cellpose's nuclei, or whole cells around them.",
        properties={
            "mask_directory": PropertySpec("directory", True, "The folder of label masks."),
            "source_entity": PropertySpec("entity", True, "The image directory entity segmented."),
            "objects": PropertySpec("string", description='What the masks label: "nuclei" or "cells".'),
            # Cells grown from nuclei (method propagate) carry the model and diameter that found those nuclei.
            "cellpose_model": PropertySpec("string", True, "Built-in model name or path of the model used."),
            "nuclei_channel": PropertySpec("integer", True, "Channel index of the nuclei."),
            "cytoplasm_channel": PropertySpec("integer", True, "Channel index of the cytoplasm."),
            "diameter": PropertySpec("string", True, 'Requested cell diameter as text, or "None" to estimate.'),
            "method": PropertySpec("string", description='Cells: "propagate" (grown from the nuclei) or "cellpose".'),
            "nuclei_mask_entity": PropertySpec("entity", description="Cells: the nuclei masks they belong to."),
            "nuclei_run_id": PropertySpec("string", description="Cells: the run that made those nuclei masks."),
            "cell_parameters": PropertySpec("json", description="Cells: the parameters of the method."),
            "border_cells": PropertySpec("json", description="Cells: per field, the cells touching the image edge."),
            "multinucleate": PropertySpec(
                "json", description="Cells (cellpose): per field, each cell holding several nuclei and those nuclei."
            ),
            "anucleate": PropertySpec(
                "json", description="Cells (cellpose): per field, how many cells held no nucleus."
            ),
            "estimated_diameter": PropertySpec("float", description="Diameter Cellpose estimated, in pixels."),
            "cellpose_version": PropertySpec("string", description="Version of Cellpose used."),
            "device": PropertySpec("string", description="Device the segmentation ran on."),
            "fields": PropertySpec("integer", description="Number of fields segmented."),
            "total_cells": PropertySpec("integer", description="Number of cells found in all fields."),
            "cells_per_field": PropertySpec("json", description="Number of cells found per field."),
            "run_id": PropertySpec("string", description="The run that produced the masks."),
            "extra_parameters": PropertySpec("json", description="Further Cellpose parameters used."),
            "source_fingerprint": PropertySpec("string", description="The images' fingerprint when segmented."),
            "model_sha256": PropertySpec("string", description="SHA-256 of the weights file used."),
        },
    ),
    DataType(
        name="cell_measurement_table",
        description="Per-object shape and nucleus/cytoplasm intensities measured on segmentation masks.",
        properties={
            "measurement_file": PropertySpec("file", True, "Parquet file, one row per object."),
            "mask_entity": PropertySpec("entity", True, "The segmentation_mask_directory measured."),
            "source_entity": PropertySpec("entity", True, "The image_directory whose pixels were measured."),
            "channel_names": PropertySpec("json", description="Names of the channels, prefixes of the columns."),
            "ring_width": PropertySpec("integer", description="Cytoplasm ring width in pixels."),
            "mask_run_id": PropertySpec("string", description="The run that made the masks measured."),
            "cytoplasm": PropertySpec("string", description='"ring" around each nucleus, or "cell" minus nucleus.'),
            "cell_mask_entity": PropertySpec("entity", description="The cell masks measured, if any."),
            "cell_mask_run_id": PropertySpec("string", description="The run that made the cell masks measured."),
            "fields": PropertySpec("integer", description="Number of fields measured."),
            "total_objects": PropertySpec("integer", description="Number of objects measured."),
            "objects_per_field": PropertySpec("json", description="Number of objects per field, zeros included."),
            "columns": PropertySpec("json", description="Columns of the table."),
            "run_id": PropertySpec("string", description="The run that measured."),
        },
    ),
    DataType(
        name="assay_readout",
        description="Plate readout of a measurement table: per-well summary, dose response, 4PL fit and Z'.",
        properties={
            "readout_directory": PropertySpec(
                "directory", True, "Folder with wells.csv, doses.csv, readout.json and the PNG figures."
            ),
            "measurement_entity": PropertySpec("entity", True, "The cell_measurement_table summarised."),
            "readout": PropertySpec("string", True, "The per-object column summarised per well."),
            "cytoplasm": PropertySpec("string", description='The cytoplasm of the ratio: "ring" or "cell".'),
            "plate_layout": PropertySpec("file", description="The plate layout used."),
            "n_cells": PropertySpec("integer", description="Number of objects on the plate."),
            "wells": PropertySpec("json", description="Per well: cells, median readout, dose, control, QC flags."),
            "z_prime": PropertySpec("float", description="Z' factor of the positive and negative controls."),
            "ec50": PropertySpec("float", description="EC50 of the 4PL fit, in dose units."),
            "fit": PropertySpec("json", description="4PL fit: bottom, top, ec50, hill, ec50_ci95, r_squared."),
            "doses": PropertySpec("json", description="Mean, SD and number of wells per dose."),
            "notes": PropertySpec("json", description="Why a part of the readout could not be computed."),
            "run_id": PropertySpec("string", description="The run that made the readout."),
        },
    ),
    DataType(
        name="cellpose_model",
        description="A trained Cellpose model file.",
        properties={
            "model_file": PropertySpec("file", True, "The model weights."),
            "training_entities": PropertySpec("json", description="Ids of the entities trained on."),
            "validation_entity": PropertySpec("entity", description="Id of the entity validated on."),
            "hyperparameters": PropertySpec("json", description="Training hyperparameters."),
            "seed": PropertySpec("integer", description="Random seed of the training."),
            "epochs": PropertySpec("integer", description="Number of epochs trained."),
            "wall_seconds": PropertySpec("float", description="Training wall-clock time in seconds."),
            "hardware": PropertySpec("string", description="Hardware trained on."),
            "precision": PropertySpec("string", description="Network arithmetic in training: float32 or bfloat16."),
            "diam_mean": PropertySpec("float", description="Mean diameter the model was trained for."),
            "diam_labels": PropertySpec("float", description="Mean diameter of the training labels."),
            "validation_ap": PropertySpec("json", description="Average precision on the validation entity."),
            "held_out_styles": PropertySpec(
                "json", description="Acquisition styles held out of training, and the average precision on each."
            ),
        },
    ),
    DataType(
        name="annotated_image_directory",
        description="A folder of images with hand-drawn annotations.",
        properties={
            "annotated_directory": PropertySpec("directory", True, "The folder of images and annotations."),
            "n_images": PropertySpec("integer", description="Number of annotated images."),
            "n_objects": PropertySpec("integer", description="Number of annotated objects."),
        },
    ),
)

DATA_TYPES: dict[str, DataType] = {data_type.name: data_type for data_type in _DATA_TYPE_DEFINITIONS}


def get_data_type(name: str) -> DataType:
    """Look up a data type by name.

    Parameters
    ----------
    name : str
        The data type's name, e.g. ``"image_directory"``.

    Returns
    -------
    DataType
        The registered data type.

    Raises
    ------
    UnknownDataTypeError
        If no data type has that name; the message lists the known names.
    """
    try:
        return DATA_TYPES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(DATA_TYPES))
        raise UnknownDataTypeError(f"unknown data type {_short_repr(name)} (known: {known})") from None
