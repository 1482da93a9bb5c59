"""Group the image files of a directory into fields of view.

Microscopy plates are often exported with one file per channel (and per site,
plane and time point), written into the file names, in folders per well or
time point. :func:`group_fields` reads the names with the naming schemes of
:mod:`mantle_assets.imaging.naming` (one per instrument: BBBC014, MetaXpress /
ImageXpress, Operetta / Opera Phenix, Yokogawa CellVoyager, Cellomics /
CellInsight, IN Cell Analyzer, and generic ``_w1`` / ``_ch1`` / ``_c1`` /
``Channel1-`` names) or a pattern the user gives, and otherwise treats every
file as one field (grey or multi-channel). :func:`read_field` then gives every
field as a ``(C, Y, X)`` array, whatever the layout on disk; channel ``c``
(1-based) is the c-th channel of a field (for RGB files 1 = red, 2 = green,
3 = blue).

Decisions worth knowing
-----------------------
* Every file is read by :mod:`mantle_assets.imaging.io`, whose notes say which
  pixel types, layouts and sizes are accepted (the per-plane pixel limit is the
  ``max_pixels`` argument) and how alpha, palettes and truncated files are
  handled. Its errors, :class:`~mantle_assets.imaging.io.ImageReadError`, are
  :class:`ImageDirectoryError`: the same class.
* A scheme is used only when *every* image file it does not ignore matches it;
  the generic suffix schemes also need two channel labels, so a directory of
  ``*_w1.tif`` files only is one-file-per-field (field names keep the ``_w1``).
* Nothing ambiguous is guessed: one-file-per-field is refused when two names
  differ only by a channel-, plane- or time-like token (``d0``/``d1``,
  ``ch1``/``ch2``, ``z01``/``z02``), a scheme that leaves fields with different
  channel sets is refused, and names that give several z-planes or time
  points are refused as a stack, not flattened.
* Sub-folders are part of the directory (a plate with a folder per well or
  time point is one image directory); symbolic links to folders are refused,
  and so are image files that cannot be opened (a symbolic link loop or one
  that leads nowhere): none is left out without a word.
* A field whose mask file name (``<field>_cp_masks.tif``) would be longer than
  the 255 bytes file systems allow is refused at grouping, not when its masks
  are written.
* Channels of one field stored in different pixel types are promoted with
  :func:`numpy.result_type` (uint8 + uint16 gives uint16, anything + float32
  gives float32, all exact).
* Fields and channel labels are sorted naturally (``s2`` before ``s10``).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from mantle_assets.imaging.io import (
    MAX_FIELD_PIXELS,
    ImageInfo,
    ImageReadError,
    format_shape,
    is_image_file,
    read_image,
    read_image_header,
)
from mantle_assets.imaging.naming import (
    ONE_FILE_PER_FIELD,
    SCHEMES,
    NamingError,
    ParsedName,
    channel_like_pair,
    natural_key,
    one_file_per_field,
    parse_name,
    user_scheme,
)

__all__ = [
    "Field",
    "FieldGrouping",
    "ImageDirectoryError",
    "MASK_SUFFIX",
    "group_fields",
    "list_image_files",
    "read_field",
]

_NO_IMAGES = "no images in {}: expected TIFF, PNG, JPEG or BMP files"

MASK_SUFFIX = "_cp_masks.tif"  # a field's mask file is <field>_cp_masks.tif, as Cellpose names it
NAME_MAX = 255  # bytes in a file name: ext4, XFS, Btrfs, ZFS, APFS, NTFS (in UTF-16 units)


# One error class for directories and the files in them, so that every ``except ImageDirectoryError``
# also catches the image reader's errors.
ImageDirectoryError = ImageReadError


@dataclass(frozen=True)
class Field:
    """One field of view.

    Attributes
    ----------
    name : str
        Field id, e.g. ``"01-A-01"``: the file name with channel, plane and
        time point cut out (:mod:`~mantle_assets.imaging.naming`); the file
        stem for one-file-per-field.
    files : tuple of Path
        One file per channel, in channel order, or a single (possibly
        multi-channel) file.
    well : str, optional
        The plate well (``"A01"``) the names give.
    site : str, optional
        The field (site) within the well as the names write it (``"s1"``).
    """

    name: str
    files: tuple[Path, ...]
    well: str | None = None
    site: str | None = None

    def __post_init__(self) -> None:
        # Accept lists and strings from callers but keep the frozen value hashable.
        object.__setattr__(self, "files", tuple(Path(f) for f in self.files))


@dataclass(frozen=True)
class FieldGrouping:
    """The fields of view found in one directory.

    Attributes
    ----------
    directory : Path
        The directory that was grouped.
    scheme : str
        The naming scheme's name (:data:`~mantle_assets.imaging.naming.SCHEMES`),
        ``"pattern"`` for a user's pattern, or ``"one-file-per-field"``.
    fields : tuple of Field
        Sorted naturally by name.
    channel_labels : tuple of str
        Per-channel schemes: the name tokens (``("w1", "w2")``);
        one-file-per-field: ``("1", "2", ...)``.
    naming_pattern : str, optional
        The user's pattern, when one was given.
    plane, timepoint : str, optional
        The one z-plane and time point of every file, where the names say.
    """

    directory: Path
    scheme: str
    fields: tuple[Field, ...]
    channel_labels: tuple[str, ...]
    naming_pattern: str | None = None
    plane: str | None = None
    timepoint: str | None = None

    @property
    def n_channels(self) -> int:
        """Number of channels of every field."""
        return len(self.channel_labels)

    @property
    def wells(self) -> list[str]:
        """The wells of the fields, in plate order (``A01, A02, ..., B01``)."""
        return sorted({field.well for field in self.fields} - {None}, key=lambda well: (len(well), well))

    def describe(self) -> str:
        """One line saying what was found.

        E.g. ``2 fields x 2 channels (ch1, ch2), wells A01, A12, scheme operetta``.
        """
        wells = self.wells
        if not wells:
            where = "no wells in the names"
        elif len(wells) <= 8:
            where = f"wells {', '.join(wells)}"
        else:
            where = f"wells {', '.join(wells[:3])}, ..., {wells[-1]} ({len(wells)} wells)"
        stack = "".join(f", {kind} {value}" for kind, value in (("plane", self.plane), ("time point", self.timepoint))
                        if value is not None)
        return (
            f"{_count(len(self.fields), 'field')} x {_count(self.n_channels, 'channel')} "
            f"({', '.join(self.channel_labels)}), {where}{stack}, scheme {self.scheme}"
        )

    def to_metadata(self) -> dict:
        """Describe the grouping as JSON-serialisable metadata.

        Returns
        -------
        dict
            ``scheme``, ``naming_pattern``, ``summary`` (:meth:`describe`),
            ``n_fields``, ``n_channels``, ``channel_labels``, ``plane``,
            ``timepoint``, ``wells`` (field name to well) and ``fields``
            (field name to file names relative to the directory).
        """
        return {
            "scheme": self.scheme,
            "naming_pattern": self.naming_pattern,
            "summary": self.describe(),
            "n_fields": len(self.fields),
            "n_channels": self.n_channels,
            "channel_labels": list(self.channel_labels),
            "plane": self.plane,
            "timepoint": self.timepoint,
            "wells": {field.name: field.well for field in self.fields},
            "fields": {field.name: [self._relative(f) for f in field.files] for field in self.fields},
        }

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.directory).as_posix()
        except ValueError:  # a hand-built Field may point elsewhere
            return path.as_posix()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------- listing


def list_image_files(directory: str | os.PathLike) -> list[Path]:
    """List the image files in a directory and its sub-folders.

    Parameters
    ----------
    directory : path
        Directory to list; sub-folders (one per well or time point, as some
        instruments write them) are part of it.

    Returns
    -------
    list of Path
        Files with a TIFF, PNG, JPEG or BMP suffix (any case), sorted by path
        below the directory. Hidden files and folders (``.name``, e.g. macOS
        ``._x.tif`` resource forks) are ignored.

    Raises
    ------
    ImageDirectoryError
        If the directory does not exist, is not a directory or a symbolic link
        loop, a folder in it cannot be listed, a sub-folder is a symbolic link
        (not followed: it could lead anywhere, even back up), or an image file
        cannot be opened (a symbolic link loop, a link to nothing, not a
        regular file).
    """
    path = _check_directory(directory)

    def unlistable(error: OSError):
        raise ImageDirectoryError(f"cannot list {error.filename}: {error.strerror or error}")

    found = []
    for root, folders, files in os.walk(path, onerror=unlistable):
        for folder in folders:
            if not folder.startswith(".") and os.path.islink(os.path.join(root, folder)):
                raise ImageDirectoryError(
                    f"{os.path.join(root, folder)}: a symbolic link to a folder inside image directory {path}; "
                    f"copy the images in or register the folder it points to"
                )
        folders[:] = sorted(folder for folder in folders if not folder.startswith("."))
        images = [Path(root, name) for name in files if not name.startswith(".") and is_image_file(name)]
        for image in images:
            _check_openable(image)
        found.extend(images)
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _check_openable(path: Path) -> None:
    """Refuse an image file that cannot be opened; left out, it would be a missing field."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:  # os.walk listed the name, so ENOENT is a link to nothing; ELOOP: a -> b -> a
        reason = "a symbolic link to nothing" if error.errno == errno.ENOENT else _reason(error)
        raise ImageDirectoryError(f"cannot read image {path}: {reason}") from None
    if not stat.S_ISREG(mode):
        raise ImageDirectoryError(f"cannot read image {path}: not a regular file")


def _reason(error: OSError) -> str:
    return "a symbolic link loop" if error.errno == errno.ELOOP else error.strerror or str(error)


def _check_directory(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise ImageDirectoryError(f"image directory {path} does not exist") from None
    except OSError as error:
        raise ImageDirectoryError(f"image directory {path}: {_reason(error)}") from None
    if not path.is_dir():
        raise ImageDirectoryError(f"{path} is not a directory")
    return path


# --------------------------------------------------------------------------- grouping

_PATTERN_HINT = (
    "if the names mean something else, register with --pattern REGEX (named groups well, field, channel, plane, "
    "timepoint)"
)


def group_fields(
    directory: str | os.PathLike,
    *,
    naming_pattern: str | None = None,
    max_pixels: int = MAX_FIELD_PIXELS,
    max_bytes: int | None = None,
) -> FieldGrouping:
    """Group the image files of a directory into fields of view.

    The first naming scheme of :data:`~mantle_assets.imaging.naming.SCHEMES`
    that every file's name matches (files it ignores, such as thumbnails, left
    out) is used, unless ``naming_pattern`` is given; with none, every file is
    one field. Only file headers are read, so this is cheap enough for large
    plates.

    Parameters
    ----------
    directory : path
        Directory holding the images, sub-folders included.
    naming_pattern : str, optional
        A regular expression with named groups (see
        :func:`~mantle_assets.imaging.naming.user_scheme`) that every image
        file must match.
    max_pixels : int
        The most pixels one channel plane of a file may have.
    max_bytes : int, optional
        The most memory reading one file may take
        (:func:`~mantle_assets.imaging.io.read_image_header`); None: no budget.

    Returns
    -------
    FieldGrouping

    Raises
    ------
    ImageDirectoryError
        One line naming the files: the directory is missing or holds no
        images; files do not match the naming pattern; one-file-per-field
        would group files whose names differ only by a channel-, plane- or
        time-like token (``d0``/``d1``, ``ch1``/``ch2``, ``z01``/``z02``);
        the names give several z-planes or time points (a stack is refused,
        not flattened); a field lacks a channel the others have, or has two
        files of one; a field's mask file name would be too long; a file is
        unreadable, empty, truncated (TIFF), of an unsupported pixel type, a
        3-D stack, smaller than 8 or larger than ``max_pixels`` pixels per
        channel, over ``max_bytes``, or does not match its field's shape or
        the other fields' channel count.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> for c in (1, 2):
    ...     tifffile.imwrite(d / f"r01c02f01p01-ch{c}sk1fk1fl1.tiff", np.full((8, 9), c, np.uint8))
    >>> grouping = group_fields(d)
    >>> grouping.describe()
    '1 field x 2 channels (ch1, ch2), wells A02, plane p01, time point sk1, scheme operetta'
    >>> read_field(grouping.fields[0])[:, 0, 0]
    array([1, 2], dtype=uint8)
    """
    path = _check_directory(directory)
    files = list_image_files(path)
    if not files:
        raise ImageDirectoryError(_NO_IMAGES.format(path))
    relative = [PurePosixPath(f.relative_to(path).as_posix()) for f in files]
    scheme, parsed = _parse_names(path, relative, naming_pattern)
    files = [(path / name, parsed[name]) for name in parsed]
    grouping = _group(path, scheme, naming_pattern, files, {"max_pixels": max_pixels, "max_bytes": max_bytes})
    for field in grouping.fields:
        mask_name = os.fsencode(f"{field.name}{MASK_SUFFIX}")
        if len(mask_name) > NAME_MAX:
            raise ImageDirectoryError(
                f"{path}: {_below(path, field.files[0])} gives field {field.name[:40]}..., whose mask file name "
                f"<field>{MASK_SUFFIX} would be {len(mask_name)} bytes, over the {NAME_MAX} file systems allow; "
                f"shorten the file name"
            )
    return grouping


def _parse_names(
    directory: Path, relative: list[PurePosixPath], naming_pattern: str | None
) -> tuple[str, dict[PurePosixPath, ParsedName]]:
    """The scheme that reads the names, and what it reads from each file it does not ignore."""
    if naming_pattern is not None:
        try:
            scheme = user_scheme(naming_pattern)
            parsed = {name: parse_name(scheme, name) for name in relative}
        except NamingError as error:
            raise ImageDirectoryError(f"{directory}: {error}") from None
        unmatched = [name for name, result in parsed.items() if result is None]
        if unmatched:
            raise ImageDirectoryError(
                f"{directory}: {len(unmatched)} of {len(relative)} image files do not match the naming pattern "
                f"{naming_pattern!r}, e.g. {unmatched[0]}"
            )
        return scheme.name, parsed  # type: ignore[return-value]
    for scheme in SCHEMES:
        kept = [name for name in relative if not scheme.ignores(name.name)]
        parsed = {}
        for name in kept:
            result = parse_name(scheme, name)
            if result is None:
                break
            parsed[name] = result
        else:
            if kept and len({result.channel for result in parsed.values()} - {None}) >= scheme.min_channels:
                return scheme.name, parsed
    parsed = {name: one_file_per_field(name) for name in relative}
    pair = channel_like_pair([result.field for result in parsed.values()])
    if pair is not None:
        first, second, kind = pair
        raise ImageDirectoryError(
            f"{directory}: {first} and {second} differ only by what looks like a {kind}, but no naming scheme "
            f"reads these names, so each would be segmented as a field of its own; register with --pattern REGEX "
            f"(named groups well, field, channel, plane, timepoint)"
        )
    return ONE_FILE_PER_FIELD, parsed


def _group(
    directory: Path, scheme: str, naming_pattern: str | None, files: list[tuple[Path, ParsedName]], limits: dict
) -> FieldGrouping:
    """The fields; ``limits``: ``max_pixels``, ``max_bytes`` for :func:`~mantle_assets.imaging.io.read_image_header`."""
    plane, timepoint = (_one_value(directory, files, kind) for kind in ("plane", "timepoint"))
    with_channel = [(path, name) for path, name in files if name.channel is not None]
    if not with_channel:
        fields, labels = _whole_file_fields(directory, files, limits)
    elif len(with_channel) < len(files):
        named = with_channel[0]
        unnamed = next((path, name) for path, name in files if name.channel is None)
        raise ImageDirectoryError(
            f"{directory}: {_below(directory, unnamed[0])} names no channel but {_below(directory, named[0])} "
            f"names {named[1].channel} (scheme {scheme}); {_PATTERN_HINT}"
        )
    else:
        fields, labels = _per_channel_fields(directory, scheme, with_channel, limits)
    return FieldGrouping(directory, scheme, fields, labels, naming_pattern, plane, timepoint)


_STACKS = {
    "plane": ("z-planes", "a z-stack; project each stack to one plane (e.g. maximum intensity) and register that"),
    "timepoint": ("time points", "a time series; register each time point's images as a directory of its own"),
}


def _one_value(directory: Path, files: list[tuple[Path, ParsedName]], kind: str) -> str | None:
    """The one plane (or time point) of every file; several are a stack the pipeline does not segment."""
    first_path, first = files[0]
    for path, name in files[1:]:
        if getattr(name, kind) != getattr(first, kind):
            what, advice = _STACKS[kind]
            raise ImageDirectoryError(
                f"{directory}: {_below(directory, first_path)} and {_below(directory, path)} are different {what} "
                f"({getattr(first, kind)}, {getattr(name, kind)}) of one plate: {advice}; the pipeline segments "
                f"2-D fields"
            )
    return getattr(first, kind)


def _per_channel_fields(
    directory: Path, scheme: str, files: list[tuple[Path, ParsedName]], limits: dict
) -> tuple[tuple[Field, ...], tuple[str, ...]]:
    by_field: dict[str, dict[str, Path]] = {}
    names: dict[str, ParsedName] = {}
    for path, name in files:
        channels = by_field.setdefault(name.field, {})
        names.setdefault(name.field, name)
        if name.channel in channels:
            raise ImageDirectoryError(
                f"{directory}: field {name.field} has two {name.channel} files: "
                f"{_below(directory, channels[name.channel])}, {_below(directory, path)}; {_PATTERN_HINT}"
            )
        channels[name.channel] = path
    labels = tuple(sorted({label for channels in by_field.values() for label in channels}, key=natural_key))
    # Check names before headers: a missing file is the likelier mistake and costs no I/O.
    for field in sorted(by_field, key=natural_key):
        for label in labels:
            if label not in by_field[field]:
                example = next(channels[label] for channels in by_field.values() if label in channels)
                raise ImageDirectoryError(
                    f"{directory}: field {field} has no {label} file, though {_below(directory, example)} is one "
                    f"(scheme {scheme}); {_PATTERN_HINT}"
                )
    fields = []
    for field in sorted(by_field, key=natural_key):
        paths = tuple(by_field[field][label] for label in labels)
        infos = [read_image_header(p, **limits) for p in paths]
        for info in infos:
            if info.n_channels not in (1, 3):
                raise ImageDirectoryError(
                    f"{info.path}: holds {info.n_channels} channels; a per-channel file must be grey "
                    f"(or RGB with equal channels)"
                )
        _check_same_shape(field, infos)
        fields.append(Field(field, paths, names[field].well, names[field].site))
    return tuple(fields), labels


def _whole_file_fields(
    directory: Path, files: list[tuple[Path, ParsedName]], limits: dict
) -> tuple[tuple[Field, ...], tuple[str, ...]]:
    by_field: dict[str, tuple[Path, ParsedName]] = {}
    for path, name in files:
        if name.field in by_field:
            raise ImageDirectoryError(
                f"{directory}: two files give field {name.field}: {_below(directory, by_field[name.field][0])}, "
                f"{_below(directory, path)}"
            )
        by_field[name.field] = (path, name)
    first = None
    fields = []
    for field in sorted(by_field, key=natural_key):
        path, name = by_field[field]
        info = read_image_header(path, **limits)
        if first is None:
            first = info
        elif info.n_channels != first.n_channels:
            raise ImageDirectoryError(
                f"{directory}: mixed channel counts: {_below(directory, first.path)} has {first.n_channels} "
                f"channel(s) but {_below(directory, info.path)} has {info.n_channels}"
            )
        fields.append(Field(field, (path,), name.well, name.site))
    assert first is not None  # group_fields refuses an empty directory
    return tuple(fields), tuple(str(c) for c in range(1, first.n_channels + 1))


def _below(directory: Path, path: Path) -> str:
    return path.relative_to(directory).as_posix()


def _check_same_shape(name: str, infos: list[ImageInfo]) -> None:
    for info in infos[1:]:
        if info.shape != infos[0].shape:
            raise ImageDirectoryError(
                f"field {name}: {info.path} is {format_shape(info.shape)} but "
                f"{infos[0].path.name} is {format_shape(infos[0].shape)}"
            )


# --------------------------------------------------------------------------- reading


def read_field(field: Field, *, max_pixels: int = MAX_FIELD_PIXELS, max_bytes: int | None = None) -> np.ndarray:
    """Read a field of view as a ``(C, Y, X)`` array.

    Parameters
    ----------
    field : Field
        A field from :func:`group_fields`.
    max_pixels : int
        The most pixels one channel plane of a file may have.
    max_bytes : int, optional
        The most memory reading one file may take
        (:func:`~mantle_assets.imaging.io.read_image`); None: no budget.

    Returns
    -------
    ndarray
        ``(C, Y, X)`` in the stored pixel type (uint8, uint16 or float32),
        alpha dropped. A per-channel file stored as RGB contributes one
        channel: the first if its channels are equal, or the only non-zero
        one (pseudo-coloured exports).

    Raises
    ------
    ImageDirectoryError
        If a file is unreadable, of an unsupported layout or pixel type, larger
        than ``max_pixels`` per channel or ``max_bytes``, has NaN or infinite
        pixels, a per-channel file is a true colour image, or the channels
        differ in shape.
    """
    if not field.files:
        raise ImageDirectoryError(f"field {field.name} has no files")
    if len(field.files) == 1:
        info = read_image(field.files[0], max_pixels=max_pixels, max_bytes=max_bytes)
        return np.ascontiguousarray(info.pixels)
    infos = [read_image(path, max_pixels=max_pixels, max_bytes=max_bytes) for path in field.files]
    _check_same_shape(field.name, infos)
    dtype = np.result_type(*(info.dtype for info in infos))
    out = np.empty((len(infos),) + infos[0].shape, dtype=dtype)
    for c, info in enumerate(infos):
        out[c] = _single_channel(info)
    return out


def _single_channel(info: ImageInfo) -> np.ndarray:
    pixels = info.pixels
    assert pixels is not None
    if pixels.shape[0] == 1:
        return pixels[0]
    if info.lossy:
        # JPEG chroma rounding leaves grey RGB a level or two apart.
        first = pixels[0].astype(np.int32)
        grey = all(np.abs(pixels[c].astype(np.int32) - first).max() <= 2 for c in range(1, len(pixels)))
    else:
        grey = all(np.array_equal(pixels[c], pixels[0]) for c in range(1, len(pixels)))
    if grey:
        return pixels[0]
    lit = [c for c in range(len(pixels)) if pixels[c].any()]
    if len(lit) == 1:
        return pixels[lit[0]]
    raise ImageDirectoryError(
        f"{info.path}: a per-channel file holds a colour image ({len(pixels)} differing channels); expected grey"
    )
