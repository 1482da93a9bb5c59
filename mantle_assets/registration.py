"""Registering image directories as entities (used by the CLI, sensors and tests)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from mantle_assets.entities import Entity, EntityStore
from mantle_assets.imaging.assay import read_plate_layout
from mantle_assets.imaging.fields import FieldGrouping, group_fields, list_image_files
from mantle_assets.imaging.measurements import check_channel_names
from mantle_assets.imaging.segmentation import check_channels, numbered_channels
from mantle_assets.settings import check_data_path, max_field_pixels, max_image_bytes, staging_root
from mantle_assets.storage import is_uri, local_copy, normalised_uri, remote_fingerprint

IMAGE_DIRECTORY = "image_directory"


def check_image_files(directory: Path) -> None:
    """Refuse a local image directory holding an image file outside the data roots, before any file is read.

    Registration checks this, and so does every run that reads the images (see
    :func:`~mantle_assets.orchestration.assets.staged_image_directory`): a file
    can be replaced by a symbolic link to a file outside the roots after
    registration.

    Raises
    ------
    OutsideDataRootsError
        One line naming the file (see :func:`~mantle_assets.settings.check_data_path`).
    ImageDirectoryError
        If the directory cannot be listed (see :func:`~mantle_assets.imaging.fields.list_image_files`).
    """
    for path in list_image_files(directory):
        check_data_path(path, "image file")


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
    naming_pattern: str | None = None,
    again: bool = False,
) -> Entity:
    """Group a directory's images into fields and record it as an ``image_directory`` entity.

    A directory already recorded by an unarchived entity (see :func:`registered_directories`)
    is not registered again: that entity is returned unchanged, unless ``again`` is true.

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
    naming_pattern : str, optional
        A regular expression with named groups (well, field, channel, plane,
        timepoint) for file names no built-in naming scheme reads; see
        :func:`~mantle_assets.imaging.fields.group_fields`. Recorded, and used
        whenever the directory is read.
    again : bool
        Record a new entity even if the directory is already registered.

    Returns
    -------
    Entity
        The new entity, or the one already recording the directory.

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
        directory's wells; or, unless ``again``, a directory already registered
        with other values of these (see :func:`existing_registration`).
    """
    # Looked up before reading any image: registering a plate twice should not cost a second pass over it.
    existing = None if again else existing_registration(
        store, directory, experiment_name=experiment_name, name=name, segmentation_defaults=segmentation_defaults,
        channel_names=channel_names, plate_layout=plate_layout, naming_pattern=naming_pattern,
    )
    if existing is not None:
        return existing
    # The resolved path is recorded: it is the one checked against the data roots (a symbolic link could be
    # pointed elsewhere later) and the one duplicates are recognised by. A URI is normalised: no trailing slash.
    directory = check_data_path(directory, "image_directory")
    with local_copy(directory, staging_root()) as images:
        if not is_uri(directory):  # a copy's files are the platform's own downloads
            check_image_files(images)
        grouping = group_fields(
            images, naming_pattern=naming_pattern, max_pixels=max_field_pixels(), max_bytes=max_image_bytes()
        )
        if channel_names is not None:
            channel_names = check_channel_names(channel_names, grouping.n_channels)
        if segmentation_defaults:
            # Channels named in the defaults (an inbox sidecar's "nuclei_channel: DNA") become this plate's numbers.
            segmentation_defaults = numbered_channels(segmentation_defaults, channel_names, grouping.channel_labels)
            check_channels(
                segmentation_defaults.get("nuclei_channel") or 0, segmentation_defaults.get("cytoplasm_channel") or 0,
                grouping.n_channels,
            )
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


def _recorded_forms(directory: str | os.PathLike) -> set[str]:
    """The texts an ``image_directory`` property recording ``directory`` may hold.

    The resolved path is what registration records; the absolute path as given is what it recorded before it
    resolved paths, and what a path is stored as when set by :meth:`~mantle_assets.entities.EntityStore.update`.
    """
    if is_uri(directory):
        return {normalised_uri(os.fspath(directory))}
    given = Path(directory).expanduser()
    # realpath, not Path.resolve(), which raises RuntimeError on a symbolic link loop (see check_data_path).
    return {Path(os.path.realpath(given)).as_posix(), Path(os.path.abspath(given)).as_posix()}


def registered_directories(
    store: EntityStore, directories: Iterable[str | os.PathLike], *, include_archived: bool = False
) -> dict[str | os.PathLike, Entity]:
    """The entities already recording some directories, in one store query.

    A directory counts as registered when an ``image_directory`` entity records
    its resolved path (symbolic links followed, trailing slashes dropped) or,
    for a URI, its normalised form.

    Parameters
    ----------
    store : EntityStore
        Where to look.
    directories : iterable of path or str
        Folders or URIs.
    include_archived : bool
        Whether archived entities count (by default an archived registration
        is one retired on purpose, so the directory may be registered anew).

    Returns
    -------
    dict
        Each given directory that is registered -> its newest entity (a directory
        registered again on purpose has several; the latest is the one meant).
    """
    forms = {directory: _recorded_forms(directory) for directory in directories}
    found = store.find(
        IMAGE_DIRECTORY, "image_directory", set().union(*forms.values()), include_archived=include_archived
    )
    by_text = {entity.properties["image_directory"]: entity for entity in found}  # ordered by id: newest last
    registered = {}
    for directory, texts in forms.items():
        matches = [by_text[text] for text in texts if text in by_text]
        if matches:
            registered[directory] = max(matches, key=lambda entity: entity.entity_id)
    return registered


def existing_registration(
    store: EntityStore,
    directory: str | os.PathLike,
    *,
    experiment_name: str | None = None,
    name: str | None = None,
    segmentation_defaults: dict | None = None,
    channel_names: Sequence[str] | None = None,
    plate_layout: str | os.PathLike | None = None,
    naming_pattern: str | None = None,
) -> Entity | None:
    """The unarchived entity already recording ``directory``, checked against the values a caller asks for.

    Parameters
    ----------
    store : EntityStore
        Where to look.
    directory : path or str
        The folder or URI about to be registered.
    experiment_name, name, segmentation_defaults, channel_names, plate_layout, naming_pattern : optional
        The values the caller would register; ``None`` (not asked for) matches anything.

    Returns
    -------
    Entity or None
        The entity, or ``None`` when the directory is not registered.

    Raises
    ------
    ValueError
        One line naming the entity and each asked-for value that differs from
        the recorded one: returning the entity would silently drop it.
    """
    entity = registered_directories(store, [directory]).get(directory)
    if entity is None:
        return None
    recorded = entity.properties
    asked = {
        "experiment_name": (experiment_name, recorded.get("experiment_name")),
        "name": (name, entity.name),
        "segmentation_defaults": (segmentation_defaults, recorded.get("segmentation_defaults")),
        "channel_names": (None if channel_names is None else list(channel_names), recorded.get("channel_names")),
        "plate_layout": (
            None if plate_layout is None else Path(plate_layout).expanduser().resolve().as_posix(),
            recorded.get("plate_layout") and Path(recorded["plate_layout"]).resolve().as_posix(),
        ),
        "naming_pattern": (naming_pattern, (recorded.get("field_grouping") or {}).get("naming_pattern")),
    }
    differences = [
        f"{key} {old!r}, not {new!r}" if old is not None else f"no {key}, not {new!r}"
        for key, (new, old) in asked.items()
        if new is not None and new != old
    ]
    if differences:
        raise ValueError(
            f"{directory} is already registered as {entity.entity_id} with {' and '.join(differences)}; "
            "pass --again to register it anew with these"
        )
    return entity


def check_plate_layout(plate_layout: str | os.PathLike, grouping: FieldGrouping) -> None:
    """Refuse a plate layout that cannot be read or that names none of the directory's wells."""
    layout_wells = set(read_plate_layout(plate_layout)["well"])
    field_wells = set(grouping.wells)
    if not field_wells:
        raise ValueError(f"plate_layout {plate_layout}: no field name in {grouping.directory} holds a well like A01")
    if not field_wells & layout_wells:
        example = sorted(field_wells)[0]
        raise ValueError(f"plate_layout {plate_layout} names none of the directory's wells (e.g. {example})")
