"""Dagster resources: the entity store and Cellpose."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dagster import ConfigurableResource, get_dagster_logger
from pydantic import PrivateAttr

from mantle_assets.entities import EntityStore
from mantle_assets.imaging.segmentation import CellposeSegmenter
from mantle_assets.models.cellpose_import import import_cellpose
from mantle_assets.models.registry import ModelSpec


class EntityStoreResource(ConfigurableResource):
    """The DuckDB entity store; ``database`` defaults to ``$MANTLE_HOME/mantle.duckdb``.

    ``lock_timeout``: seconds a step waits for another process's transaction
    before its attempt fails and is retried (see ``retried_while_store_busy``).
    """

    database: str | None = None
    lock_timeout: float = 300.0

    def store(self) -> EntityStore:
        return EntityStore(self.database, lock_timeout=self.lock_timeout)


class CellposeResource(ConfigurableResource):
    """Loads Cellpose models, each once per step however many images it segments.

    ``gpu``: ``None`` uses the GPU whenever torch sees one. ``precision``: the
    network's arithmetic, ``auto`` (bfloat16 on CPUs with AMX, else float32),
    ``float32`` (Cellpose's own) or ``bfloat16``.
    """

    gpu: bool | None = None
    precision: str = "auto"
    _loaded: dict = PrivateAttr(default_factory=dict)

    def segmenter(self, spec: ModelSpec) -> CellposeSegmenter:
        if spec.path not in self._loaded:
            start = time.perf_counter()
            import_cellpose()
            segmenter = CellposeSegmenter(
                spec.path,
                builtin_name=spec.name if spec.kind == "builtin" else None,
                gpu=self.gpu,
                precision=self.precision,
            )
            get_dagster_logger().info(
                f"loaded model {spec.name} on {segmenter.device} in {segmenter.precision} "
                f"in {time.perf_counter() - start:.1f} s"
            )
            self._loaded[spec.path] = segmenter
        return self._loaded[spec.path]


class InboxResource(ConfigurableResource):
    """The inbox folder (default ``$MANTLE_INBOX``) and how long a new folder must stay unchanged."""

    directory: str | None = None
    quiet_seconds: float = 120.0

    def path(self) -> Path | None:
        configured = self.directory or os.environ.get("MANTLE_INBOX")
        return Path(configured).expanduser() if configured else None
