"""Registering image directories as entities (used by the CLI, sensors and tests)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from mantle_assets.entities import Entity, EntityStore
from mantle_assets.imaging.assay import read_plate_layout
from mantle_assets.imaging.fields import FieldGrouping, group_fields, list_image_files
from mantle_assets.imaging.measurements import check_channel_names
from mantle_assets.settings import check_data_path, max_field_pixels, staging_root
from mantle_assets.storage import is_uri, local_copy, remote_fingerprint

IMAGE_DIRECTORY = "image_directory"


def directory_fingerprint(directory: str | os.PathLike) -> tuple[int, str]:
    """Count the image files of a directory and fingerprint them.

    The fingerprint hashes each image file's path below the directory, size
    and modification time: rewriting, adding, removing or renaming an image
    (in a sub-folder too) changes it, and it costs
    one ``stat`` per file instead of reading whole plates. A URI is
    fingerprinted from its listing (:func:`~mantle_assets.storage.remote_fingerprint`).

    Returns
    -------
    (int, str)
        File count and a hex SHA-256 digest.
    """
    if is_uri(directory):
        return remote_fingerprint(directory)
    digest = hashlib.sha256()
    files = list_image_files(directory)
    for path in files:
        stat = path.stat()
        name = path.relative_to(directory).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return len(files), digest.hexdigest()


def image_directory_properties(directory: str | os.PathLike, grouping: FieldGrouping,
                               experiment_name: str | None) -> dict:
    """The properties of an image_directory entity; ``grouping`` may be of a local copy of ``directory``."""
    file_count, fingerprint = directory_fingerprint(directory)
    return {
        "image_directory": str(directory),
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
    channel_names: Sequence[str] | None = None,
    plate_layout: str | os.PathLike | None = None,
) -> Entity:
    """Group a directory's images into fields and record it as an ``image_directory`` entity.

    Parameters
    ----------
    store : EntityStore
        Where to record it.
    directory : path or str
        The folder of images, or a URI such as ``s3://lab/plate1``, whose
        images are checked on a local copy under ``$MANTLE_HOME/staging``
        (removed afterwards) and recorded as the URI.
    experiment_name : str, optional
        The experiment it belongs to.
    name : str, optional
        Entity name; the folder's name by default.
    segmentation_defaults : dict, optional
        Default segmentation parameters of automatic runs.
    channel_names : sequence of str, optional
        One name per channel (e.g. ``["NFkB", "DNA"]``), used for measurement columns.
    plate_layout : path, optional
        CSV of well -> treatment, dose, control flag; see
        :func:`~mantle_assets.imaging.assay.read_plate_layout`.

    Raises
    ------
    ImageDirectoryError
        If the directory holds no readable images, or a URI cannot be listed
        (nothing is recorded).
    OutsideDataRootsError
        If the directory, an image or the plate layout lies outside the data
        roots (see :func:`~mantle_assets.settings.check_data_path`).
    ValueError
        One line naming the parameter or file: channel names that do not fit
        the channels, an unreadable plate layout, or one that names none of the
        directory's wells.
    """
    checked = check_data_path(directory, "image_directory")
    directory = checked if is_uri(checked) else Path(directory)  # a URI normalised: no trailing slash
    with local_copy(directory, staging_root()) as images:
        grouping = group_fields(images, max_pixels=max_field_pixels())
        if not is_uri(directory):  # a copy's files are the platform's own downloads
            for field in grouping.fields:
                for path in field.files:
                    check_data_path(path, "image file")
        if channel_names is not None:
            channel_names = check_channel_names(channel_names, grouping.n_channels)
        if plate_layout is not None:
            check_data_path(plate_layout, "plate_layout")
            check_plate_layout(plate_layout, grouping)
        properties = image_directory_properties(directory, grouping, experiment_name)
    return store.register(
        IMAGE_DIRECTORY,
        name or Path(grouping.directory).name,
        {
            **properties,
            "segmentation_defaults": segmentation_defaults,
            "channel_names": channel_names,
            "plate_layout": plate_layout,
        },
    )


def check_plate_layout(plate_layout: str | os.PathLike, grouping: FieldGrouping) -> None:
    """Refuse a plate layout that cannot be read or that names none of the directory's wells."""
    layout_wells = set(read_plate_layout(plate_layout)["well"])
    field_wells = set(grouping.wells)
    if not field_wells:
        raise ValueError(f"plate_layout {plate_layout}: no field name in {grouping.directory} holds a well like A01")
    if not field_wells & layout_wells:
        example = sorted(field_wells)[0]
        raise ValueError(f"plate_layout {plate_layout} names none of the directory's wells (e.g. {example})")
