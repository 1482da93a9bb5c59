"""Run parameters of the segmentation asset (Mantle's names and meanings).

Every field defaults to ``None``: "the experiment's default". A run launched from the UI with an
empty config therefore segments with the image directory's ``segmentation_defaults`` (``mantle
defaults``, the inbox sidecar), and where those say nothing, with the platform's defaults below.
The asset resolves them at run time and records the values it used.
"""

from __future__ import annotations

from collections.abc import Mapping

from dagster import Config
from pydantic import Field

from mantle_assets.imaging.segmentation import SegmentationSettings, check_channels, parse_diameter, resolve_channel

DEFAULT_MODEL = "mantle-nuclei-v1"

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
}

_UNSET = " Leave empty (null) for the experiment's default"


class SegmentationConfig(Config):
    cellpose_model: str | None = Field(
        default=None,
        description="Bundled model name, Cellpose built-in name (nuclei, cyto3, ...) or model file path."
        f"{_UNSET}, else {DEFAULT_MODEL}.",
    )
    nuclei_channel: int | None = Field(
        default=None,
        description="Nuclear channel: 0 = none, c >= 1 = the c-th channel of a field (1/2/3 = red/green/blue in "
        f"RGB files).{_UNSET}, else 0.",
    )
    cytoplasm_channel: int | None = Field(
        default=None,
        description="Channel to segment: 0 = grayscale (the channels' mean), c >= 1 = the c-th channel of a field; "
        f"equal to nuclei_channel for nuclei only.{_UNSET}, else 0.",
    )
    diameter: str | None = Field(
        default=None,
        description=f"Object diameter in pixels, or 'None' to estimate it per field.{_UNSET}, else 'None'.",
    )
    flow_threshold: float | None = Field(default=None, description=f"Cellpose's flow threshold.{_UNSET}, else 0.4.")
    cellprob_threshold: float | None = Field(
        default=None, description=f"Cellpose's cell probability threshold.{_UNSET}, else 0.0."
    )
    min_size: int | None = Field(
        default=None, description=f"Smallest object kept, in pixels.{_UNSET}, else 15."
    )
    batch_size: int | None = Field(default=None, description=f"Cellpose's batch size.{_UNSET}, else 8.")

    def resolve(self, defaults: Mapping | None = None) -> SegmentationConfig:
        """Every parameter set: this config's values, else ``defaults`` (the experiment's), else the platform's."""
        given = {name: value for name, value in self.model_dump().items() if value is not None}
        experiment = {name: value for name, value in (defaults or {}).items() if value is not None}
        return SegmentationConfig(**{**PLATFORM_DEFAULTS, **experiment, **given})

    def resolved_for(self, entity) -> SegmentationConfig:
        """Resolved against an image_directory entity's ``segmentation_defaults``."""
        return self.resolve(entity.properties.get("segmentation_defaults"))

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
        ``channel_labels``, name the channels (see :func:`resolve_channel`).
    parameters : mapping
        Segmentation parameters; ``nuclei_channel`` and ``cytoplasm_channel`` may be
        numbers, numbers as text, or channel names. Unset (None) ones stay unset.

    Raises
    ------
    ParameterError
        One line naming the parameter and the entity's channels.
    """
    labels = (entity.properties.get("field_grouping") or {}).get("channel_labels") or ()
    return dict(parameters) | {
        name: resolve_channel(parameters[name], entity.properties.get("channel_names"), labels, name)
        for name in ("nuclei_channel", "cytoplasm_channel")
        if parameters.get(name) is not None
    }
