"""Registering image directories as entities (used by the CLI, sensors and tests)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mantle_assets.entities import Entity, EntityStore
from mantle_assets.imaging.fields import FieldGrouping, group_fields, list_image_files

IMAGE_DIRECTORY = "image_directory"


def directory_fingerprint(directory: str | os.PathLike) -> tuple[int, str]:
    """Count the image files of a directory and fingerprint them.

    The fingerprint hashes each image file's name, size and modification time:
    rewriting, adding, removing or renaming an image changes it, and it costs
    one ``stat`` per file instead of reading whole plates.

    Returns
    -------
    (int, str)
        File count and a hex SHA-256 digest.
    """
    digest = hashlib.sha256()
    files = list_image_files(directory)
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return len(files), digest.hexdigest()


def image_directory_properties(grouping: FieldGrouping, experiment_name: str | None) -> dict:
    file_count, fingerprint = directory_fingerprint(grouping.directory)
    return {
        "image_directory": str(grouping.directory),
        "experiment_name": experiment_name,
        "field_grouping": grouping.to_metadata(),
        "file_count": file_count,
        "fingerprint": fingerprint,
    }


def register_image_directory(
    store: EntityStore,
    directory: str | os.PathLike,
    experiment_name: str | None = None,
    *,
    name: str | None = None,
    segmentation_defaults: dict | None = None,
) -> Entity:
    """Group a directory's images into fields and record it as an ``image_directory`` entity.

    Raises
    ------
    ImageDirectoryError
        If the directory holds no readable images (nothing is recorded).
    """
    grouping = group_fields(directory)
    return store.register(
        IMAGE_DIRECTORY,
        name or Path(grouping.directory).name,
        {**image_directory_properties(grouping, experiment_name), "segmentation_defaults": segmentation_defaults},
    )
