"""Image and mask directories on object storage: fsspec URIs beside local paths.

A *location* is a local path or a URI such as ``s3://lab/plate1``, ``gs://...``,
``az://...`` or ``memory://...``: anything `fsspec <https://filesystem-spec.readthedocs.io>`_
has an implementation for (``s3fs`` for S3, ``gcsfs`` for Google Cloud Storage,
``adlfs`` for Azure). The image-reading code reads local files only, so a URI
directory is downloaded into a scratch directory for the time it is read
(:func:`local_copy`); its fingerprint comes from the listing alone
(:func:`remote_fingerprint`).

Endpoints and credentials are fsspec's own configuration, read from the
environment on every call: ``FSSPEC_<PROTOCOL>_<KWARG>`` variables become
keyword arguments of the file system (``FSSPEC_S3_ENDPOINT_URL=http://minio:9000``
for an S3-compatible server), and the libraries underneath read their usual
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ...)
and files. fsspec's configuration files (``~/.config/fsspec/*.json``) work too.

fsspec and the imaging modules are imported where they are used: the settings
and the entity types import this module for :func:`is_uri`, and the ``mantle``
command starts without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

__all__ = [
    "is_directory",
    "is_uri",
    "local_copy",
    "normalised_uri",
    "remote_fingerprint",
    "remote_image_files",
    "remove",
    "upload_directory",
]

_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)
# What tells one version of an object from another, best first: a content hash where the
# store keeps one (S3, GCS, Azure), else a modification or creation time.
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created")


def is_uri(location: str | os.PathLike) -> bool:
    """Whether a location is a URI with a scheme other than ``file`` (e.g. ``s3://lab/plate1``).

    Examples
    --------
    >>> is_uri("s3://lab/plate1"), is_uri("memory://x"), is_uri("/data/plate1"), is_uri("file:///data")
    (True, True, False, False)
    """
    match = _URI.match(location) if isinstance(location, str) else None
    return match is not None and match["scheme"].lower() != "file"


def normalised_uri(uri: str) -> str:
    """A URI with its scheme in lower case and without trailing slashes.

    Examples
    --------
    >>> normalised_uri("S3://lab/plate1/")
    's3://lab/plate1'
    """
    match = _URI.match(uri)
    if match is None:
        raise ValueError(f"{uri} is not a URI like s3://bucket/prefix")
    return f"{match['scheme'].lower()}://{match['rest'].rstrip('/')}"


def _filesystem(uri: str):
    """The fsspec file system of a URI and the path within it."""
    import fsspec

    # fsspec reads FSSPEC_<PROTOCOL>_<KWARG> once, on import; read them again so that,
    # like Mantle's own settings, they are the environment's when used.
    fsspec.config.set_conf_env(fsspec.config.conf)
    return fsspec.core.url_to_fs(uri)


def remote_image_files(uri: str) -> list[dict]:
    """List the image files under a URI, sub-folders included, as the file system describes them.

    Parameters
    ----------
    uri : str
        Directory (prefix) to list; like a local image directory, its
        sub-folders (one per well or time point) are part of it.

    Returns
    -------
    list of dict
        fsspec's entries (``name``, ``size`` and what the store adds, e.g.
        ``ETag``) of the objects with a TIFF, PNG, JPEG or BMP suffix, plus
        ``relative``: the path below the URI. Hidden objects and folders
        (``.name``) are left out. Sorted by ``relative``.

    Raises
    ------
    ImageDirectoryError
        One line naming the URI: nothing is there, it is an object rather than
        a directory, the scheme has no fsspec implementation installed, or the
        store refused the listing.
    """
    from mantle_assets.imaging.fields import ImageDirectoryError
    from mantle_assets.imaging.io import is_image_file

    try:
        fs, path = _filesystem(uri)
        fs.invalidate_cache(path)  # another process may have written there since the last listing
        is_file = fs.isfile(path)
        entries = {} if is_file else fs.find(path, detail=True)
        if not is_file and not entries and not fs.isdir(path):
            raise FileNotFoundError(path)
    except FileNotFoundError:
        raise ImageDirectoryError(f"image directory {uri} does not exist") from None
    except (OSError, ValueError, ImportError) as error:  # e.g. denied, unknown protocol, s3fs missing
        raise ImageDirectoryError(f"image directory {uri}: {_one_line(error)}") from None
    if is_file:
        raise ImageDirectoryError(f"{uri} is not a directory")
    root = path.strip("/")
    files = []
    for name, entry in entries.items():
        relative = PurePosixPath(name.strip("/")).relative_to(root)
        if entry["type"] == "file" and not any(part.startswith(".") for part in relative.parts) and is_image_file(
            relative.name
        ):
            files.append({**entry, "relative": relative.as_posix()})
    return sorted(files, key=lambda entry: entry["relative"])


def remote_fingerprint(uri: str) -> tuple[int, str]:
    """Count the image files under a URI and fingerprint them from one listing.

    Like :func:`mantle_assets.registration.directory_fingerprint` for local
    directories, but nothing is downloaded: each file's name, size and version
    (its ETag where the store gives one, else its modification or creation
    time) are hashed, so rewriting, adding, removing or renaming an image
    changes the fingerprint.

    Returns
    -------
    (int, str)
        File count and a hex SHA-256 digest.

    Raises
    ------
    ImageDirectoryError
        As :func:`remote_image_files`.
    """
    digest = hashlib.sha256()
    files = remote_image_files(uri)
    for entry in files:
        version = next((entry[key] for key in _VERSION_KEYS if entry.get(key) is not None), "")
        digest.update(f"{entry['relative']}\0{entry['size']}\0{version}\n".encode())
    return len(files), digest.hexdigest()


def is_directory(location: str | os.PathLike) -> bool:
    """Whether a local directory or a directory (prefix) under a URI exists.

    False too when the store cannot be asked (no fsspec implementation for the
    scheme, access denied, unreachable).
    """
    if not is_uri(location):
        return Path(location).is_dir()
    try:
        fs, path = _filesystem(location)
        fs.invalidate_cache(path)
        return fs.isdir(path)
    except (OSError, ValueError, ImportError):
        return False


@contextlib.contextmanager
def local_copy(location: str | os.PathLike, scratch_root: Path, prefix: str = "") -> Iterator[Path]:
    """Yield a local directory holding a location's image files (sub-folders kept).

    A local location is yielded as it is. A URI's image files (see
    :func:`remote_image_files`) are downloaded into a new directory under
    ``scratch_root``; it is removed when the block ends, however it ends.

    Errors of the block (``ValueError``, e.g. an unreadable image) that name
    the local copy are changed to name the URI instead.

    Parameters
    ----------
    location : path or str
        A local directory or a URI.
    scratch_root : Path
        Where the copy goes (created if missing), e.g. ``$MANTLE_HOME/staging``.
    prefix : str
        Start of the copy's directory name, e.g. a run id, so that the copies
        of a killed process can be found and removed.

    Yields
    ------
    Path
        The directory; a copy is named like the URI's last segment, so that
        names derived from it (an entity's default name) match.

    Raises
    ------
    ImageDirectoryError
        As :func:`remote_image_files`, before the block runs.
    """
    if not is_uri(location):
        yield Path(location)
        return
    files = remote_image_files(location)
    fs, path = _filesystem(location)
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root))
    try:
        local = scratch / (PurePosixPath(path).name or "root")
        local.mkdir()
        targets = [local / entry["relative"] for entry in files]
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        if files:
            fs.get([entry["name"] for entry in files], [str(target) for target in targets])
        try:
            yield local
        except ValueError as error:
            if error.args and isinstance(error.args[0], str):
                error.args = (error.args[0].replace(str(local), location), *error.args[1:])
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def upload_directory(local: Path, uri: str) -> None:
    """Copy every file under a local directory to the same relative names under a URI.

    Parameters
    ----------
    local : Path
        The directory to upload (recursed into).
    uri : str
        Destination prefix, e.g. ``s3://lab/masks/E000001/<run id>``.
    """
    fs, path = _filesystem(uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    # Explicit file lists: fsspec's directory-to-directory copy nests or not depending on
    # whether the destination exists already.
    fs.put([str(p) for p in files], [f"{path}/{p.relative_to(local).as_posix()}" for p in files])
    fs.invalidate_cache(path)


def remove(uri: str) -> None:
    """Delete everything under a URI; nothing there is not an error."""
    fs, path = _filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
    fs.invalidate_cache(path)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
