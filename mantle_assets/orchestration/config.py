"""Run parameters of the segmentation asset (Mantle's names and meanings)."""

from __future__ import annotations

from dagster import Config
from pydantic import Field

from mantle_assets.imaging.segmentation import SegmentationSettings, check_channels, parse_diameter

DEFAULT_MODEL = "mantle-nuclei-v1"


class SegmentationConfig(Config):
    cellpose_model: str = Field(
        default=DEFAULT_MODEL,
        description="Bundled model name, Cellpose built-in name (nuclei, cyto3, ...) or model file path.",
    )
    nuclei_channel: int = Field(default=0, description="Nuclear channel: 0 = none, 1 = red, 2 = green, 3 = blue.")
    cytoplasm_channel: int = Field(
        default=0,
        description="Channel to segment: 0 = grayscale, 1/2/3 = R/G/B; equal to nuclei_channel for nuclei only.",
    )
    diameter: str = Field(default="None", description="Object diameter in pixels, or 'None' to estimate it.")
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    batch_size: int = 8

    def settings(self) -> SegmentationSettings:
        """Validated Cellpose settings; raises ``ParameterError`` naming the bad parameter."""
        check_channels(self.nuclei_channel, self.cytoplasm_channel)
        return SegmentationSettings(
            diameter=parse_diameter(self.diameter),
            flow_threshold=self.flow_threshold,
            cellprob_threshold=self.cellprob_threshold,
            min_size=self.min_size,
            batch_size=self.batch_size,
        )

    def parameters(self) -> dict:
        """The four Mantle pipeline parameters, as recorded on lineage edges."""
        return {
            "cellpose_model": self.cellpose_model,
            "nuclei_channel": self.nuclei_channel,
            "cytoplasm_channel": self.cytoplasm_channel,
            "diameter": self.diameter,
        }
