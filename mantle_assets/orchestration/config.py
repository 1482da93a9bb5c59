"""Run parameters of the segmentation asset (Mantle's names and meanings).

Every field defaults to ``None``: "the experiment's default". A run launched from the UI with an
empty config therefore segments with the image directory's ``segmentation_defaults`` (``mantle
defaults``, the inbox sidecar), and where those say nothing, with the platform's defaults below.
The asset resolves them at run time and records the values it used.

``diameter`` and the channels are typed ``Any`` for Dagster: its config schema has no union of
scalars, and the launchpad's editor must take ``diameter: 17``, ``17.5``, ``'17'`` and ``None``
(YAML's ``None`` is text; ``null`` is "the experiment's default"), and a channel as a number or a
name. The values are read as ``mantle segment`` reads them (:func:`coerce_segmentation_parameters`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

from dagster import Config
from pydantic import Field, model_validator

from mantle_assets.imaging.segmentation import (
    ParameterError,
    SegmentationSettings,
    check_channels,
    numbered_channels,
    parse_diameter,
)

DEFAULT_MODEL = "mantle-nuclei-v1"

# How cell_masks grows cells (CellConfig.method); a plate whose defaults name one gets cells automatically.
CELL_METHODS = ("propagate", "cellpose")
NO_CELLS = "none"

# Used for a parameter that neither the run nor the experiment's defaults set.
PLATFORM_DEFAULTS = {
    "cellpose_model": DEFAULT_MODEL,
    "nuclei_channel": 0,
    "cytoplasm_channel": 0,
    "diameter": "None",
    "flow_threshold": 0.4,
    "cellprob_threshold": 0.0,
    "min_size": 15,
    "batch_size": 8,
    "cell_method": NO_CELLS,
}

_UNSET = " Leave empty (null) for the experiment's default"
# Numbers or text to the launchpad (see the module's docstring).
_FREE_FORM = ("nuclei_channel", "cytoplasm_channel", "diameter")


class SegmentationConfig(Config):
    cellpose_model: str | None = Field(
        default=None,
        description="Bundled model name, Cellpose built-in name (nuclei, cyto3, ...) or model file path."
        f"{_UNSET}, else {DEFAULT_MODEL}.",
    )
    nuclei_channel: Any = Field(
        default=None,
        description="Nuclear channel: 0 = none, c >= 1 = the c-th channel of a field (1/2/3 = red/green/blue in "
        f"RGB files), or a channel's name (DNA).{_UNSET}, else 0.",
    )
    cytoplasm_channel: Any = Field(
        default=None,
        description="Channel to segment: 0 = grayscale (the channels' mean), c >= 1 = the c-th channel of a field, "
        f"or a channel's name; equal to nuclei_channel for nuclei only.{_UNSET}, else 0.",
    )
    diameter: Any = Field(
        default=None,
        description="Object diameter in pixels (17, 17.5 or '17'), or None to estimate it per field."
        f"{_UNSET}, else None.",
    )
    flow_threshold: float | None = Field(default=None, description=f"Cellpose's flow threshold.{_UNSET}, else 0.4.")
    cellprob_threshold: float | None = Field(
        default=None, description=f"Cellpose's cell probability threshold.{_UNSET}, else 0.0."
    )
    min_size: int | None = Field(
        default=None, description=f"Smallest object kept, in pixels.{_UNSET}, else 15."
    )
    batch_size: int | None = Field(default=None, description=f"Cellpose's batch size.{_UNSET}, else 8.")
    cell_method: str | None = Field(
        default=None,
        description="As an experiment's default: whole cells the automation grows around each new nuclei mask "
        f"(cell_job, then measurements with cytoplasm: cell): {', '.join(CELL_METHODS)} or {NO_CELLS}; a "
        f"segmentation run itself ignores it.{_UNSET}, else {NO_CELLS}.",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_free_form(cls, values):
        """``diameter`` as its text (``17`` -> ``"17"``), channels given as text as numbers where they are numbers.

        A value that does not read stays as given: :meth:`resolve`, which every use of the config goes
        through, refuses it in one line when the run checks its parameters, whereas raised here, in
        Dagster's construction of the config, it would reach the run page as a pydantic stack trace.
        """
        if not isinstance(values, Mapping):
            return values
        read = {}
        for name in _FREE_FORM:
            if values.get(name) is not None:
                with contextlib.suppress(ParameterError):
                    read |= coerce_segmentation_parameters({name: values[name]})
        return {**values, **read}

    def resolve(self, defaults: Mapping | None = None) -> SegmentationConfig:
        """Every parameter set: this config's values, else ``defaults`` (the experiment's), else the platform's.

        Raises ``ParameterError`` naming a free-form parameter whose value does not read (see
        :func:`coerce_segmentation_parameters`); the others were typed by Dagster's schema.
        """
        given = self.model_dump(exclude_none=True)
        given |= coerce_segmentation_parameters({name: given[name] for name in _FREE_FORM if name in given})
        experiment = {name: value for name, value in (defaults or {}).items() if value is not None}
        return SegmentationConfig(**{**PLATFORM_DEFAULTS, **experiment, **given})

    def resolved_for(self, entity) -> SegmentationConfig:
        """Resolved against an image_directory entity: channel names read as its channel numbers, unset
        parameters taken from its ``segmentation_defaults``.

        Raises
        ------
        ParameterError
            One line naming the parameter: a value of the wrong type, or a name that is none of the
            entity's channels (see :func:`channel_numbers`).
        """
        given = channel_numbers(entity, self.model_dump(exclude_none=True))
        return SegmentationConfig(**given).resolve(entity.properties.get("segmentation_defaults"))

    def settings(self) -> SegmentationSettings:
        """Validated Cellpose settings, unset values taken from the platform's defaults.

        Raises ``ParameterError`` naming the bad parameter.
        """
        resolved = self.resolve()
        check_channels(resolved.nuclei_channel, resolved.cytoplasm_channel)
        return SegmentationSettings(
            diameter=parse_diameter(resolved.diameter),
            flow_threshold=resolved.flow_threshold,
            cellprob_threshold=resolved.cellprob_threshold,
            min_size=resolved.min_size,
            batch_size=resolved.batch_size,
        )

    def parameters(self) -> dict:
        """The four Mantle pipeline parameters, as recorded on lineage edges."""
        resolved = self.resolve()
        return {
            "cellpose_model": resolved.cellpose_model,
            "nuclei_channel": resolved.nuclei_channel,
            "cytoplasm_channel": resolved.cytoplasm_channel,
            "diameter": resolved.diameter,
        }


def channel_numbers(entity, parameters: Mapping) -> dict:
    """``parameters`` with the channels given by name or as text turned into the entity's channel numbers.

    Parameters
    ----------
    entity : Entity
        An image_directory entity: its ``channel_names``, then its field grouping's
        ``channel_labels``, name the channels (see :func:`~mantle_assets.imaging.segmentation.resolve_channel`).
    parameters : mapping
        Segmentation parameters; ``nuclei_channel`` and ``cytoplasm_channel`` may be
        numbers, numbers as text, or channel names. Unset (None) ones stay unset.

    Raises
    ------
    ParameterError
        One line naming the parameter and the entity's channels.
    """
    labels = (entity.properties.get("field_grouping") or {}).get("channel_labels") or ()
    return numbered_channels(parameters, entity.properties.get("channel_names"), labels)


def coerce_segmentation_parameters(values: Mapping, where: str = "") -> dict:
    """Segmentation parameters given as text or as YAML/JSON values, turned into the types of SegmentationConfig.

    The one reading of parameters that people write: ``mantle segment`` and ``mantle defaults`` options and
    the inbox sidecar's ``segmentation_defaults`` go through it, so that they cannot read a value differently.
    Only types are coerced here; ranges (a channel the images lack, a negative diameter) are checked when the
    parameters are used (:meth:`SegmentationConfig.settings`, :func:`channel_numbers`). The launchpad's values
    go through it too, when the run resolves its config (:meth:`SegmentationConfig.resolve`).

    Parameters
    ----------
    values : Mapping
        Parameter name -> value. A ``None`` value leaves the parameter unset, except ``diameter``, whose
        ``None`` (like ``"None"``) asks for the diameter to be estimated, as in Cellpose. Numbers may be
        given as text (``"12"``); a channel given by name (``"DNA"``) is kept for :func:`channel_numbers`.
    where : str
        Where the values come from (e.g. ``".../experiment.yaml: segmentation_defaults"``), the start of
        error messages.

    Returns
    -------
    dict
        The parameters that were given, typed: ``diameter`` as its text (``"12"``, ``"None"``), channels as
        ``int`` or a name, ``min_size``/``batch_size`` as ``int``, thresholds as ``float``.

    Raises
    ------
    ParameterError
        One line naming ``where``, the parameter and the value: an unknown parameter, or a value of the
        wrong type (a list, a boolean, text that is no number where a number is needed).

    Examples
    --------
    >>> coerce_segmentation_parameters({"diameter": 12, "nuclei_channel": "2", "min_size": None})
    {'diameter': '12', 'nuclei_channel': 2}
    >>> coerce_segmentation_parameters({"diameter": None, "cytoplasm_channel": "DNA"})
    {'diameter': 'None', 'cytoplasm_channel': 'DNA'}
    """
    prefix = f"{where}: " if where else ""

    def refuse(name: str, value, expected: str) -> ParameterError:
        return ParameterError(f"{prefix}{name} must be {expected}, got {value!r}")

    def number(name: str, value, kind: type, expected: str):
        # bool is an int subclass, but `diameter: yes` in YAML is a slip, not 1 pixel.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise refuse(name, value, expected)
        try:
            parsed = float(value)
        except ValueError:
            raise refuse(name, value, expected) from None
        if not math.isfinite(parsed):
            raise refuse(name, value, expected)
        if kind is int:
            if not parsed.is_integer():
                raise refuse(name, value, expected)
            return int(parsed)
        return parsed

    coerced = {}
    for name, value in values.items():
        if name not in SegmentationConfig.model_fields:
            known = ", ".join(SegmentationConfig.model_fields)
            raise ParameterError(f"{prefix}unknown parameter {name!r} (known: {known})")
        if name == "diameter":
            if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
                coerced[name] = "None"
                continue
            number(name, value, float, "a number of pixels or None")  # refuses the type; the text is kept
            coerced[name] = value.strip() if isinstance(value, str) else str(value)
        elif value is None:
            continue
        elif name == "cell_method":
            if value not in (*CELL_METHODS, NO_CELLS):
                raise refuse(name, value, f"one of {', '.join((*CELL_METHODS, NO_CELLS))}")
            coerced[name] = value
        elif name == "cellpose_model":
            if not isinstance(value, str) or not value.strip():
                raise refuse(name, value, "a model name or file")
            coerced[name] = value
        elif name in ("nuclei_channel", "cytoplasm_channel"):
            if isinstance(value, str) and value.strip() and not _is_number(value):
                coerced[name] = value.strip()  # a channel name: only the entity's channels can resolve it
            else:
                coerced[name] = number(name, value, int, "a channel number or name")
        elif name in ("min_size", "batch_size"):
            coerced[name] = number(name, value, int, "a whole number")
        else:
            coerced[name] = number(name, value, float, "a number")
    return coerced


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
