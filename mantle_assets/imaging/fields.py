"""Group the image files of a directory into fields of view.

Microscopy plates are often exported with one file per channel, the channel
written into the file name. :func:`group_fields` recognises four such naming
schemes and otherwise treats every file as one field (grey or multi-channel).
:func:`read_field` then gives every field as a ``(C, Y, X)`` array, whatever
the layout on disk; channel ``c`` (1-based) is colour ``c`` in the pipeline
parameters (1 = red, 2 = green, 3 = blue).

Patterns (channel label, field name):

* ``channel-prefix``: ``Channel2-01-A-01.tif`` (BBBC014) -> ``Channel2``, ``01-A-01``
* ``w-suffix``: ``IXMtest_A02_s1_w1.tif`` or ``IXMtest_A02_s1_w1051DAA7C-...tif``
  (MetaXpress, with UUID) -> ``w1``, ``IXMtest_A02_s1``
* ``ch-suffix``: ``pos01_ch00.tif`` (Leica) -> ``ch00``, ``pos01``
* ``c-suffix``: ``img_c1.tif`` -> ``c1``, ``img``
* ``one-file-per-field``: anything else -> ``1``, ``2``, ...; the file stem

Decisions worth knowing
-----------------------
* Every file is read by :mod:`mantle_assets.imaging.io`, whose notes say which
  pixel types, layouts and sizes are accepted (the per-plane pixel limit is the
  ``max_pixels`` argument) and how alpha, palettes and truncated files are
  handled. Its errors, :class:`~mantle_assets.imaging.io.ImageReadError`, are
  :class:`ImageDirectoryError`: the same class.
* A per-channel scheme is used only when *every* image file matches it and it
  yields at least two channel labels; a directory of ``*_w1.tif`` files only is
  one-file-per-field (field names keep the ``_w1``).
* Channels of one field stored in different pixel types are promoted with
  :func:`numpy.result_type` (uint8 + uint16 gives uint16, anything + float32
  gives float32, all exact).
* ``.ome`` before ``.tif`` is not part of a field name.
* Fields and channel labels are sorted naturally (``s2`` before ``s10``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

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

__all__ = [
    "Field",
    "FieldGrouping",
    "ImageDirectoryError",
    "group_fields",
    "list_image_files",
    "read_field",
    "well_of",
]

_UUID = r"[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}"
# Tried in this order; the first scheme that every file matches wins.
_SCHEMES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("channel-prefix", re.compile(r"^(?P<label>channel\d+)[-_](?P<field>.+)$", re.IGNORECASE)),
    # MetaXpress appends a UUID straight after the wavelength; its fixed length
    # is what tells "w1" + "051DAA7C-..." from "w10" + "51DAA7C-...".
    ("w-suffix", re.compile(rf"^(?P<field>.+)_(?P<label>w\d+)(?:{_UUID})?$", re.IGNORECASE)),
    ("ch-suffix", re.compile(r"^(?P<field>.+)_(?P<label>ch\d+)$", re.IGNORECASE)),
    ("c-suffix", re.compile(r"^(?P<field>.+)_(?P<label>c\d+)$", re.IGNORECASE)),
)
ONE_FILE_PER_FIELD = "one-file-per-field"

_NO_IMAGES = "no images in {}: expected TIFF, PNG, JPEG or BMP files"


# One error class for directories and the files in them, so that every ``except ImageDirectoryError``
# also catches the image reader's errors.
ImageDirectoryError = ImageReadError


@dataclass(frozen=True)
class Field:
    """One field of view.

    Attributes
    ----------
    name : str
        Field id, e.g. ``"01-A-01"``; the file stem for one-file-per-field.
    files : tuple of Path
        One file per channel, in channel order, or a single (possibly
        multi-channel) file.
    """

    name: str
    files: tuple[Path, ...]

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
    pattern : str
        ``"channel-prefix"``, ``"w-suffix"``, ``"c-suffix"``, ``"ch-suffix"``
        or ``"one-file-per-field"``.
    fields : tuple of Field
        Sorted naturally by name.
    channel_labels : tuple of str
        Per-channel schemes: the name tokens (``("w1", "w2")``);
        one-file-per-field: ``("1", "2", ...)``.
    """

    directory: Path
    pattern: str
    fields: tuple[Field, ...]
    channel_labels: tuple[str, ...]

    @property
    def n_channels(self) -> int:
        """Number of channels of every field."""
        return len(self.channel_labels)

    def to_metadata(self) -> dict:
        """Describe the grouping as JSON-serialisable metadata.

        Returns
        -------
        dict
            ``pattern``, ``n_fields``, ``n_channels``, ``channel_labels`` and
            ``fields`` (field name to file names relative to the directory).
        """
        return {
            "pattern": self.pattern,
            "n_fields": len(self.fields),
            "n_channels": self.n_channels,
            "channel_labels": list(self.channel_labels),
            "fields": {field.name: [self._relative(f) for f in field.files] for field in self.fields},
        }

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.directory).as_posix()
        except ValueError:  # a hand-built Field may point elsewhere
            return path.as_posix()


# --------------------------------------------------------------------------- listing


def list_image_files(directory: str | os.PathLike) -> list[Path]:
    """List the image files directly inside a directory.

    Parameters
    ----------
    directory : path
        Directory to list (not recursed into).

    Returns
    -------
    list of Path
        Files with a TIFF, PNG, JPEG or BMP suffix (any case), sorted by name.
        Hidden files (``.name``, e.g. macOS ``._x.tif`` resource forks) are
        ignored.

    Raises
    ------
    ImageDirectoryError
        If the directory does not exist or is not a directory.
    """
    path = _check_directory(directory)
    return sorted(
        (p for p in path.iterdir() if not p.name.startswith(".") and is_image_file(p) and p.is_file()),
        key=lambda p: p.name,
    )


def _check_directory(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    if not path.exists():
        raise ImageDirectoryError(f"image directory {path} does not exist")
    if not path.is_dir():
        raise ImageDirectoryError(f"{path} is not a directory")
    return path


# --------------------------------------------------------------------------- grouping


def group_fields(directory: str | os.PathLike, *, max_pixels: int = MAX_FIELD_PIXELS) -> FieldGrouping:
    """Group the image files of a directory into fields of view.

    Only file headers are read, so this is cheap enough for large plates.

    Parameters
    ----------
    directory : path
        Directory holding the images (not recursed into).
    max_pixels : int
        The most pixels one channel plane of a file may have.

    Returns
    -------
    FieldGrouping

    Raises
    ------
    ImageDirectoryError
        If the directory is missing or holds no images, a field lacks a
        channel, a file is unreadable, empty, truncated (TIFF), of an
        unsupported pixel type, a 3-D stack, larger than ``max_pixels`` per
        channel, or does not match its field's shape or the other fields'
        channel count.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> for c in (1, 2):
    ...     tifffile.imwrite(d / f"Channel{c}-01-A-01.tif", np.full((4, 5), c, np.uint8))
    >>> grouping = group_fields(d)
    >>> grouping.pattern, grouping.channel_labels, grouping.fields[0].name
    ('channel-prefix', ('Channel1', 'Channel2'), '01-A-01')
    >>> read_field(grouping.fields[0])[:, 0, 0]
    array([1, 2], dtype=uint8)
    """
    path = _check_directory(directory)
    files = list_image_files(path)
    if not files:
        raise ImageDirectoryError(_NO_IMAGES.format(path))
    for pattern, regex in _SCHEMES:
        matches = [regex.match(_stem(f)) for f in files]
        if all(matches) and len({m["label"] for m in matches}) >= 2:
            return _group_per_channel(path, pattern, files, matches, max_pixels)
    return _group_one_file_per_field(path, files, max_pixels)


def _group_per_channel(
    directory: Path, pattern: str, files: list[Path], matches: list[re.Match[str]], max_pixels: int
) -> FieldGrouping:
    by_field: dict[str, dict[str, Path]] = {}
    for path, match in zip(files, matches, strict=True):
        channels = by_field.setdefault(match["field"], {})
        label = match["label"]
        if label in channels:
            raise ImageDirectoryError(
                f"{directory}: field {match['field']} has two {label} files: {channels[label].name}, {path.name}"
            )
        channels[label] = path
    labels = tuple(sorted({label for channels in by_field.values() for label in channels}, key=_natural_key))
    # Check names before headers: a missing file is the likelier mistake and costs no I/O.
    for name in sorted(by_field, key=_natural_key):
        for label in labels:
            if label not in by_field[name]:
                raise ImageDirectoryError(f"{directory}: field {name} has no {label} file")

    fields = []
    for name in sorted(by_field, key=_natural_key):
        paths = tuple(by_field[name][label] for label in labels)
        infos = [read_image_header(p, max_pixels=max_pixels) for p in paths]
        for info in infos:
            if info.n_channels not in (1, 3):
                raise ImageDirectoryError(
                    f"{info.path}: holds {info.n_channels} channels; a per-channel file must be grey "
                    f"(or RGB with equal channels)"
                )
        _check_same_shape(name, infos)
        fields.append(Field(name, paths))
    return FieldGrouping(directory, pattern, tuple(fields), labels)


def _group_one_file_per_field(directory: Path, files: list[Path], max_pixels: int) -> FieldGrouping:
    by_name: dict[str, Path] = {}
    for path in files:
        name = _stem(path)
        if name in by_name:
            raise ImageDirectoryError(f"{directory}: two files give field {name}: {by_name[name].name}, {path.name}")
        by_name[name] = path
    first = None
    fields = []
    for name in sorted(by_name, key=_natural_key):
        info = read_image_header(by_name[name], max_pixels=max_pixels)
        if first is None:
            first = info
        elif info.n_channels != first.n_channels:
            raise ImageDirectoryError(
                f"{directory}: mixed channel counts: {first.path.name} has {first.n_channels} "
                f"channel(s) but {info.path.name} has {info.n_channels}"
            )
        fields.append(Field(name, (info.path,)))
    assert first is not None  # group_fields refuses an empty directory
    labels = tuple(str(c) for c in range(1, first.n_channels + 1))
    return FieldGrouping(directory, ONE_FILE_PER_FIELD, tuple(fields), labels)


def _check_same_shape(name: str, infos: list[ImageInfo]) -> None:
    for info in infos[1:]:
        if info.shape != infos[0].shape:
            raise ImageDirectoryError(
                f"field {name}: {info.path} is {format_shape(info.shape)} but "
                f"{infos[0].path.name} is {format_shape(infos[0].shape)}"
            )


# --------------------------------------------------------------------------- reading


def read_field(field: Field, *, max_pixels: int = MAX_FIELD_PIXELS) -> np.ndarray:
    """Read a field of view as a ``(C, Y, X)`` array.

    Parameters
    ----------
    field : Field
        A field from :func:`group_fields`.
    max_pixels : int
        The most pixels one channel plane of a file may have.

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
        than ``max_pixels`` per channel, a per-channel file is a true colour
        image, or the channels differ in shape.
    """
    if not field.files:
        raise ImageDirectoryError(f"field {field.name} has no files")
    if len(field.files) == 1:
        info = read_image(field.files[0], max_pixels=max_pixels)
        return np.ascontiguousarray(info.pixels)
    infos = [read_image(path, max_pixels=max_pixels) for path in field.files]
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


# --------------------------------------------------------------------------- names


def _stem(path: Path) -> str:
    stem = path.stem
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def _natural_key(text: str) -> tuple:
    parts = re.split(r"(\d+)", text)
    # Odd positions are always the digit runs, so ints never meet strs in comparison.
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), text


_ROW_COLUMN = re.compile(r"(?<![A-Za-z0-9])r(\d{1,2})c(\d{1,2})(?!\d)")
# Rows A-P (384) and AA-AF (1536); upper case only, so "s1", "w1", "c0" are no wells.
_WELL = re.compile(r"(?<![A-Za-z0-9])(A[A-F]|[A-P])[-_]?(\d{1,2})(?!\d)")


def well_of(field_name: str) -> str | None:
    """Extract the plate well from a field name.

    Parameters
    ----------
    field_name : str
        A field name such as ``"01-A-01"``, ``"IXMtest_A02_s1"`` or an
        Operetta ``"r02c03f01p01"``.

    Returns
    -------
    str or None
        The well as row letter(s) and two-digit column (``"A01"``), or None
        when the name holds no well.

    Examples
    --------
    >>> well_of("01-A-01"), well_of("IXMtest_A02_s1"), well_of("r02c03f01p01")
    ('A01', 'A02', 'B03')
    >>> well_of("image_0001") is None
    True
    """
    match = _ROW_COLUMN.search(field_name)
    if match:
        row, column = int(match[1]), int(match[2])
        if 1 <= row <= 32 and 1 <= column <= 48:
            return f"{_row_letters(row)}{column:02d}"
    for match in _WELL.finditer(field_name):
        column = int(match[2])
        if 1 <= column <= 48:
            return f"{match[1]}{column:02d}"
    return None


def _row_letters(row: int) -> str:
    return chr(ord("A") + row - 1) if row <= 26 else "A" + chr(ord("A") + row - 27)
