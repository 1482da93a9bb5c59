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
* A per-channel scheme is used only when *every* image file matches it and it
  yields at least two channel labels; a directory of ``*_w1.tif`` files only is
  one-file-per-field (field names keep the ``_w1``).
* Accepted pixel types are uint8, uint16 and float32. Everything else (bool,
  int8, int16, int32, int64, uint32, float16, float64) is refused with a
  message naming the file, so that no silent rescaling happens here.
* Alpha is dropped from RGBA/LA PNG, JPEG and BMP files, and from TIFFs that
  declare an alpha sample -- except TIFFs written by tifffile from a bare array
  ("shaped" TIFFs), because tifffile tags every ``(4, Y, X)`` or ``(Y, X, 4)``
  array as RGBA, so there the fourth plane is usually a fourth channel.
* TIFF axes metadata (ImageJ, OME) that says Z or T marks a 3-D or time stack
  even when it is small; otherwise the channel axis is the first or last
  dimension, whichever is smaller, and it must be at most 8.
* Palette images are read through their palette (grey palette: one channel,
  colour palette: RGB).
* Channels of one field stored in different pixel types are promoted with
  :func:`numpy.result_type` (uint8 + uint16 gives uint16, anything + float32
  gives float32, all exact).
* ``.ome`` before ``.tif`` is not part of a field name.
* Fields and channel labels are sorted naturally (``s2`` before ``s10``).
* Images too large to process in one piece are refused, not tiled: a file
  whose channel plane has more than ``MAX_FIELD_PIXELS`` = 2**28 pixels
  (16384 x 16384) is refused from its header, naming the file and the limit,
  before any pixels are read. One such float32 plane is 1 GiB and Cellpose
  keeps several float32 arrays of the image's size (flows, cell probability)
  at once. Set ``MANTLE_MAX_FIELD_PIXELS`` to change the limit; split larger
  images into tiles before registering them. (Pillow refuses PNG, JPEG and
  BMP files above its own decompression-bomb limit, about 179 M pixels.)
* A TIFF whose pixel data or pages (IFDs) lie past the end of the file (a
  truncated copy) is refused from its header; truncated PNG and JPEG files
  are only found when their pixels are read.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mantle_assets.imaging.io import TIFF_SUFFIXES, is_image_file

__all__ = [
    "MAX_FIELD_PIXELS",
    "Field",
    "FieldGrouping",
    "ImageDirectoryError",
    "group_fields",
    "list_image_files",
    "max_field_pixels",
    "read_field",
    "well_of",
]

MAX_CHANNELS = 8
MAX_FIELD_PIXELS = 2**28  # per channel plane; see the module notes
MAX_FIELD_PIXELS_ENV = "MANTLE_MAX_FIELD_PIXELS"
SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))

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


class ImageDirectoryError(ValueError):
    """A directory or image file that cannot be used as a set of fields.

    The message is one line and names the directory or the file.
    """


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


def group_fields(directory: str | os.PathLike) -> FieldGrouping:
    """Group the image files of a directory into fields of view.

    Only file headers are read, so this is cheap enough for large plates.

    Parameters
    ----------
    directory : path
        Directory holding the images (not recursed into).

    Returns
    -------
    FieldGrouping

    Raises
    ------
    ImageDirectoryError
        If the directory is missing or holds no images, a field lacks a
        channel, a file is unreadable, empty, truncated (TIFF), of an
        unsupported pixel type, a 3-D stack, larger than
        :func:`max_field_pixels` per channel, or does not match its field's
        shape or the other fields' channel count.

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
            return _group_per_channel(path, pattern, files, matches)
    return _group_one_file_per_field(path, files)


def _group_per_channel(
    directory: Path, pattern: str, files: list[Path], matches: list[re.Match[str]]
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
        infos = [_open_image(p) for p in paths]
        for info in infos:
            if info.n_channels not in (1, 3):
                raise ImageDirectoryError(
                    f"{info.path}: holds {info.n_channels} channels; a per-channel file must be grey "
                    f"(or RGB with equal channels)"
                )
        _check_same_shape(name, infos)
        fields.append(Field(name, paths))
    return FieldGrouping(directory, pattern, tuple(fields), labels)


def _group_one_file_per_field(directory: Path, files: list[Path]) -> FieldGrouping:
    by_name: dict[str, Path] = {}
    for path in files:
        name = _stem(path)
        if name in by_name:
            raise ImageDirectoryError(f"{directory}: two files give field {name}: {by_name[name].name}, {path.name}")
        by_name[name] = path
    first = None
    fields = []
    for name in sorted(by_name, key=_natural_key):
        info = _open_image(by_name[name])
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


def _check_same_shape(name: str, infos: list[_ImageInfo]) -> None:
    for info in infos[1:]:
        if info.shape != infos[0].shape:
            raise ImageDirectoryError(
                f"field {name}: {info.path} is {_format_shape(info.shape)} but "
                f"{infos[0].path.name} is {_format_shape(infos[0].shape)}"
            )


# --------------------------------------------------------------------------- reading


def read_field(field: Field) -> np.ndarray:
    """Read a field of view as a ``(C, Y, X)`` array.

    Parameters
    ----------
    field : Field
        A field from :func:`group_fields`.

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
        If a file is unreadable, of an unsupported layout or pixel type, a
        per-channel file is a true colour image, or the channels differ in
        shape.
    """
    if not field.files:
        raise ImageDirectoryError(f"field {field.name} has no files")
    if len(field.files) == 1:
        info = _open_image(field.files[0], decode=True)
        return np.ascontiguousarray(info.pixels)
    infos = [_open_image(path, decode=True) for path in field.files]
    _check_same_shape(field.name, infos)
    dtype = np.result_type(*(info.dtype for info in infos))
    out = np.empty((len(infos),) + infos[0].shape, dtype=dtype)
    for c, info in enumerate(infos):
        out[c] = _single_channel(info)
    return out


def _single_channel(info: _ImageInfo) -> np.ndarray:
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


# --------------------------------------------------------------------------- file headers


@dataclass
class _ImageInfo:
    path: Path
    shape: tuple[int, int]  # (Y, X)
    n_channels: int  # after dropping alpha
    dtype: np.dtype
    lossy: bool
    pixels: np.ndarray | None = None  # (C, Y, X), only when decoded


def _open_image(path: Path, decode: bool = False) -> _ImageInfo:
    """Read one file's header (and pixels if ``decode``) into an ``_ImageInfo``.

    Header and pixel reading share this code so that group_fields and read_field
    can never disagree about a file's layout.
    """
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageDirectoryError(f"cannot read image {path}: {error.strerror or error}") from None
    if size == 0:
        raise ImageDirectoryError(f"cannot read image {path}: the file is empty")
    opener = _open_tiff if path.suffix.lower() in TIFF_SUFFIXES else _open_pil
    try:
        return opener(path, decode)
    except ImageDirectoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means an unreadable file
        message = " ".join(str(error).split()) or type(error).__name__
        raise ImageDirectoryError(f"cannot read image {path}: {message}") from None


class _BrokenPageChain(logging.Handler):
    """Notes tifffile's report, from this thread, of a page (IFD) offset past the end of the file.

    tifffile logs that and carries on with the pages before it, so a truncated
    ImageJ or OME stack would otherwise read as its first plane.
    """

    _MESSAGE = re.compile(r"invalid (page offset|offset to page)")

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and self._MESSAGE.search(record.getMessage()):
            self.broken = True


def _open_tiff(path: Path, decode: bool) -> _ImageInfo:
    import tifffile

    chain = _BrokenPageChain()
    tifffile_logger = logging.getLogger("tifffile")
    tifffile_logger.addHandler(chain)
    try:
        return _read_tiff(tifffile, path, decode, chain)
    finally:
        tifffile_logger.removeHandler(chain)


def _read_tiff(tifffile, path: Path, decode: bool, chain: _BrokenPageChain) -> _ImageInfo:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if chain.broken:
            raise ImageDirectoryError(f"cannot read image {path}: the file is truncated (a page lies past its end)")
        shape, axes = tuple(series.shape), series.axes
        page = series.pages[0] if series.pages else tif.pages[0]
        photometric = int(getattr(page, "photometric", 0) or 0)
        extrasamples = tuple(int(e) for e in (getattr(page, "extrasamples", ()) or ()))
        # 1, 2 = associated / unassociated alpha; see module notes on shaped files.
        has_alpha = photometric == 2 and any(e in (1, 2) for e in extrasamples) and not tif.is_shaped
        if series.dtype is None or not shape or 0 in shape:  # tifffile reads a tag-less page as float64 ()
            raise ImageDirectoryError(f"cannot read image {path}: the TIFF holds no image data")
        dtype = _native(np.dtype(series.dtype))
        _check_dtype(path, dtype)
        shape, axes = _squeeze_leading(shape, axes)
        layout = _layout(path, shape, axes)
        _check_plane_size(path, _plane_shape(shape, layout))
        _check_complete(path, series, tif.filehandle.size)
        pixels = None
        if decode:
            data = np.asarray(series.asarray()).reshape(shape)
            pixels = _to_cyx(data.astype(dtype, copy=False), layout)
    return _finish(path, shape, layout, dtype, has_alpha, lossy=False, pixels=pixels)


# mode: (pixel type, channels stored, alpha stored last, mode to convert to before reading)
_PIL_MODES: dict[str, tuple[str, int, bool, str | None]] = {
    "L": ("uint8", 1, False, None),
    "LA": ("uint8", 2, True, None),
    "La": ("uint8", 2, True, None),
    "RGB": ("uint8", 3, False, None),
    "RGBA": ("uint8", 4, True, None),
    "RGBa": ("uint8", 4, True, None),
    "RGBX": ("uint8", 4, True, None),
    "CMYK": ("uint8", 3, False, "RGB"),
    "YCbCr": ("uint8", 3, False, "RGB"),
    "I;16": ("uint16", 1, False, None),
    "I;16L": ("uint16", 1, False, None),
    "I;16B": ("uint16", 1, False, None),
    "I;16N": ("uint16", 1, False, None),
    "F": ("float32", 1, False, None),
    # Refused below, listed so that the message names the real pixel type.
    "1": ("bool", 1, False, None),
    "I": ("int32", 1, False, None),
    "I;16S": ("int16", 1, False, None),
}


def _open_pil(path: Path, decode: bool) -> _ImageInfo:
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        if mode in ("P", "PA"):
            entry = ("uint8", 1, False, "L") if _palette_is_grey(image) else ("uint8", 3, False, "RGB")
        elif mode in _PIL_MODES:
            entry = _PIL_MODES[mode]
        else:
            raise ImageDirectoryError(f"{path}: unsupported image mode {mode}")
        dtype_name, stored, has_alpha, convert = entry
        dtype = np.dtype(dtype_name)
        _check_dtype(path, dtype)
        shape = (image.size[1], image.size[0])
        layout = ("last", stored) if stored > 1 else ("grey", 1)
        _check_plane_size(path, shape)
        pixels = None
        if decode:
            data = np.asarray(image.convert(convert) if convert else image)
            pixels = _to_cyx(data.astype(_native(data.dtype), copy=False), layout)
        lossy = image.format == "JPEG"
    return _finish(path, shape, layout, dtype, has_alpha, lossy=lossy, pixels=pixels)


def _palette_is_grey(image) -> bool:
    # image.getpalette() would decode the pixels; the raw palette is already in the header.
    palette = getattr(image, "palette", None)
    if palette is None:
        return False
    mode = getattr(palette, "rawmode", None) or getattr(palette, "mode", "RGB")
    if mode not in ("RGB", "RGBA", "RGBX", "BGR", "BGRX"):
        return False
    data = bytes(palette.palette)
    step = len(mode)
    return all(data[i] == data[i + 1] == data[i + 2] for i in range(0, len(data) - step + 1, step))


def _finish(
    path: Path,
    shape: tuple[int, ...],
    layout: tuple[str, int],
    dtype: np.dtype,
    has_alpha: bool,
    lossy: bool,
    pixels: np.ndarray | None,
) -> _ImageInfo:
    _, n_channels = layout
    if has_alpha and n_channels > 1:
        n_channels -= 1
        if pixels is not None:
            pixels = pixels[:n_channels]
    yx = _plane_shape(shape, layout)
    if pixels is not None and pixels.shape[1:] != yx:  # a header that lies about the pixels
        raise ImageDirectoryError(f"cannot read image {path}: header says {yx} but pixels are {pixels.shape[1:]}")
    return _ImageInfo(path, yx, n_channels, dtype, lossy, pixels)  # type: ignore[arg-type]


def _plane_shape(shape: tuple[int, ...], layout: tuple[str, int]) -> tuple[int, ...]:
    kind, _ = layout
    return tuple(shape) if kind == "grey" else tuple(shape[:2]) if kind == "last" else tuple(shape[1:])


def max_field_pixels() -> int:
    """The per-plane pixel limit: ``$MANTLE_MAX_FIELD_PIXELS`` or ``MAX_FIELD_PIXELS``."""
    value = os.environ.get(MAX_FIELD_PIXELS_ENV, "").strip()
    if not value:
        return MAX_FIELD_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ImageDirectoryError(f"{MAX_FIELD_PIXELS_ENV} must be a positive whole number, got {value!r}")
    return limit


def _check_plane_size(path: Path, yx: tuple[int, ...]) -> None:
    pixels = math.prod(yx)
    limit = max_field_pixels()
    if pixels > limit:
        raise ImageDirectoryError(
            f"{path}: {_format_shape(yx)} = {pixels} pixels per channel exceeds the limit of {limit} "
            f"({MAX_FIELD_PIXELS_ENV}); split the image into tiles"
        )


def _check_complete(path: Path, series, file_size: int) -> None:
    """Refuse a TIFF whose pixel data, as its header places it, runs past the end of the file."""
    end = max(
        (
            offset + count
            for page in series.pages
            if page is not None
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False)
        ),
        default=0,
    )
    if getattr(series, "dataoffset", None) is not None:  # contiguous series: one block of nbytes
        end = max(end, series.dataoffset + series.nbytes)
    if end > file_size:
        raise ImageDirectoryError(
            f"cannot read image {path}: the file is truncated ({file_size} bytes, pixel data ends at byte {end})"
        )


def _squeeze_leading(shape: tuple[int, ...], axes: str) -> tuple[tuple[int, ...], str]:
    # ImageJ and OME writers pad with singleton T/Z/C axes.
    axes = axes if len(axes) == len(shape) else "Q" * len(shape)
    while len(shape) > 2 and shape[0] == 1:
        shape, axes = shape[1:], axes[1:]
    return shape, axes


def _layout(path: Path, shape: tuple[int, ...], axes: str) -> tuple[str, int]:
    """Return ``("grey", 1)``, ``("last", C)`` or ``("first", C)`` for a stored shape."""
    if len(shape) == 2:
        return "grey", 1
    if len(shape) != 3:
        raise ImageDirectoryError(
            f"{path}: image of shape {shape} has {len(shape)} dimensions; "
            f"expected (Y, X), (Y, X, C) or (C, Y, X) with C <= {MAX_CHANNELS}"
        )
    first, last = shape[0], shape[-1]
    if "Z" in axes or "T" in axes:
        kind = "z" if "Z" in axes else "time"
        raise ImageDirectoryError(
            f"{path}: shape {shape} looks like a 3-D stack ({kind} axis in the file's metadata), not channels"
        )
    if axes.endswith("S") or (last <= MAX_CHANNELS and last <= first and not axes.startswith(("C", "S"))):
        kind, n = "last", last
    else:
        kind, n = "first", first
    if n > MAX_CHANNELS:
        raise ImageDirectoryError(
            f"{path}: shape {shape} looks like a 3-D stack, not a channel stack of at most {MAX_CHANNELS} channels"
        )
    return kind, n


def _to_cyx(data: np.ndarray, layout: tuple[str, int]) -> np.ndarray:
    kind, _ = layout
    if kind == "grey":
        return data[np.newaxis]
    if kind == "last":
        return np.moveaxis(data, -1, 0)
    return data


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        name = "bool (1-bit)" if dtype == np.bool_ else str(dtype)
        raise ImageDirectoryError(f"{path}: unsupported pixel type {name}; expected uint8, uint16 or float32")


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=")


# --------------------------------------------------------------------------- names


def _stem(path: Path) -> str:
    stem = path.stem
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def _natural_key(text: str) -> tuple:
    parts = re.split(r"(\d+)", text)
    # Odd positions are always the digit runs, so ints never meet strs in comparison.
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), text


def _format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


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
