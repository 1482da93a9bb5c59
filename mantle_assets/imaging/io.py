"""Reading and writing single image files: the one image reader.

Every image Mantle reads -- the fields of an image directory, the masks it
measures, the annotated images and masks it trains on -- goes through
:func:`read_image_header`, :func:`read_image` or :func:`read_label_image`, so
that all of them get the same checks, from the file's header, before any pixels
are decoded. :func:`read_image` gives every file as a ``(C, Y, X)`` array,
whatever its layout on disk. Errors are :class:`ImageReadError`, one line
naming the file.

Decisions worth knowing
-----------------------
* Accepted pixel types of images are uint8, uint16 and float32
  (``IMAGE_DTYPES``). Everything else (bool, int8, int16, int32, int64, uint32,
  float16, float64) is refused with a message naming the file, so that no silent
  rescaling happens here.
* Label images (masks) accept uint8, uint16 and uint32 (``LABEL_DTYPES``), the
  types :func:`write_label_image` and Cellpose write; signed, floating-point and
  1-bit labels are refused, as are labels with more than one channel and JPEG
  labels (lossy compression changes label values). A palette label image is
  read as its palette indices, which are the labels.
* Alpha is dropped from RGBA/LA PNG, JPEG and BMP files, and from TIFFs that
  declare an alpha sample -- except TIFFs written by tifffile from a bare array
  ("shaped" TIFFs), because tifffile tags every ``(4, Y, X)`` or ``(Y, X, 4)``
  array as RGBA, so there the fourth plane is usually a fourth channel.
* TIFF axes metadata (ImageJ, OME) that says Z or T marks a 3-D or time stack
  even when it is small; otherwise the channel axis is the first or last
  dimension, whichever is smaller, and it must be at most 8.
* Palette images are read through their palette (grey palette: one channel,
  colour palette: RGB).
* Images too large to process in one piece are refused, not tiled: a file
  whose channel plane has more than ``max_pixels`` pixels is refused from its
  header, naming the file and the limit, before any pixels are read. The
  caller gives the limit; the platform's is ``MAX_FIELD_PIXELS`` = 2**28
  (16384 x 16384) unless ``MANTLE_MAX_FIELD_PIXELS`` is set (read by
  :func:`mantle_assets.settings.max_field_pixels`, not here). One such float32
  plane is 1 GiB and Cellpose keeps several float32 arrays of the image's size
  (flows, cell probability) at once. Split larger images into tiles before
  registering them. (Pillow refuses PNG, JPEG and BMP files above its own
  decompression-bomb limit, about 179 M pixels.)
* Images that would not fit in memory are refused from their header too,
  when the caller gives a budget (``max_bytes``; the platform's is
  :func:`mantle_assets.settings.max_image_bytes`, half the machine's memory
  unless ``MANTLE_MAX_IMAGE_BYTES`` is set): the pixel count alone admits a
  16384 x 16384 TIFF of zeros that zlib packs into 277 KB. A file is charged
  ``Y * X * C * (2 * itemsize + 4)`` bytes: the decoder's array and the
  ``(C, Y, X)`` copy made from it, and the float32 copy segmentation works on
  (:func:`~mantle_assets.imaging.segmentation.select_channels`; measurements
  take one float64 channel at a time, less). What Cellpose needs on top
  depends on the diameter and is checked by
  :func:`~mantle_assets.imaging.segmentation.check_cellpose_memory`.
* Images smaller than ``MIN_SIDE`` = 8 pixels a side are refused: Cellpose 3
  squeezes axes of length 1 and takes a short axis for channels, so such
  fields gave wrong-shaped masks or errors deep inside it (tried: 1x1, 1x40,
  5x7, 7x40; 8x8 and larger segment).
* Floating-point images with NaN or infinite pixels are refused when their
  pixels are decoded (the header cannot say): Cellpose's normalisation turns
  a single NaN into a field of NaN, which segments as 0 objects without an
  error.
* A TIFF whose pixel data or pages (IFDs) lie past the end of the file (a
  truncated copy) is refused from its header; truncated PNG and JPEG files
  are only found when their pixels are read.
* Decoder messages are cut to one line and their quotes of the file's bytes
  (``header=b'root'`` for a text file named ``x.tif``) are dropped.
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

__all__ = [
    "IMAGE_DTYPES",
    "IMAGE_SUFFIXES",
    "LABEL_DTYPES",
    "MAX_FIELD_PIXELS",
    "MIN_SIDE",
    "TIFF_SUFFIXES",
    "ImageInfo",
    "ImageReadError",
    "format_bytes",
    "format_shape",
    "is_image_file",
    "read_image",
    "read_image_header",
    "read_label_image",
    "write_label_image",
]

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png", ".jpg", ".jpeg", ".bmp")

MAX_CHANNELS = 8
MAX_FIELD_PIXELS = 2**28  # per channel plane; see the module notes
MIN_SIDE = 8  # pixels; see the module notes
IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
LABEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))


class ImageReadError(ValueError):
    """An image file, or a directory of them, that cannot be read or used.

    The message is one line and names the file or the directory.
    ``mantle_assets.imaging.fields.ImageDirectoryError`` is this class.
    """


@dataclass(frozen=True, eq=False)  # eq=False: ``pixels`` is an array, which == cannot compare
class ImageInfo:
    """What the header of one image file says, and its pixels once decoded.

    Attributes
    ----------
    path : Path
        The file.
    shape : tuple of int
        ``(Y, X)`` of one channel plane.
    n_channels : int
        Channels, alpha not counted.
    dtype : numpy.dtype
        Pixel type, in native byte order.
    lossy : bool
        Whether the file is lossily compressed (JPEG).
    pixels : ndarray or None
        ``(C, Y, X)``, alpha dropped; set by :func:`read_image` only.
    """

    path: Path
    shape: tuple[int, int]
    n_channels: int
    dtype: np.dtype
    lossy: bool
    pixels: np.ndarray | None = None


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a path has one of the supported image suffixes (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image_header(path: str | os.PathLike, *, max_pixels: int, max_bytes: int | None = None) -> ImageInfo:
    """Check one TIFF, PNG, JPEG or BMP file from its header, without decoding its pixels.

    Parameters
    ----------
    path : path
        The image file.
    max_pixels : int
        The most pixels one channel plane may have (see the module notes).
    max_bytes : int, optional
        The most memory reading and preparing the file may take (see the
        module notes); None: no budget.

    Returns
    -------
    ImageInfo
        With ``pixels`` None.

    Raises
    ------
    ImageReadError
        If the file is missing, empty, not an image, truncated (TIFF), of an
        unsupported pixel type or layout (a 3-D stack), smaller than
        ``MIN_SIDE`` pixels a side, has more than ``max_pixels`` pixels per
        channel or would take more than ``max_bytes``.
    """
    return _open_image(Path(path), _Reading(decode=False, max_pixels=max_pixels, max_bytes=max_bytes, labels=False))


def read_image(path: str | os.PathLike, *, max_pixels: int, max_bytes: int | None = None) -> ImageInfo:
    """Read one TIFF, PNG, JPEG or BMP file, checked as :func:`read_image_header` checks it.

    Parameters
    ----------
    path : path
        The image file.
    max_pixels : int
        The most pixels one channel plane may have (see the module notes).
    max_bytes : int, optional
        As for :func:`read_image_header`.

    Returns
    -------
    ImageInfo
        With ``pixels`` the ``(C, Y, X)`` array in the stored pixel type
        (uint8, uint16 or float32), alpha dropped.

    Raises
    ------
    ImageReadError
        As :func:`read_image_header`, or if the pixels cannot be decoded
        (a truncated PNG or JPEG), do not match the header, or are float
        and not all finite (NaN, infinity).

    Examples
    --------
    >>> import tempfile, tifffile
    >>> path = Path(tempfile.mkdtemp()) / "rgb.tif"
    >>> tifffile.imwrite(path, np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    >>> info = read_image(path, max_pixels=MAX_FIELD_PIXELS)
    >>> info.shape, info.n_channels, info.pixels.shape
    ((8, 9), 3, (3, 8, 9))
    """
    return _open_image(Path(path), _Reading(decode=True, max_pixels=max_pixels, max_bytes=max_bytes, labels=False))


def read_label_image(path: str | os.PathLike, *, max_pixels: int, max_bytes: int | None = None) -> np.ndarray:
    """Read a label image (a mask: 0 = background, 1, 2, ... = objects) with the reader's checks.

    Parameters
    ----------
    path : path
        The label image, e.g. as :func:`write_label_image` writes it.
    max_pixels : int
        The most pixels the image may have (see the module notes).
    max_bytes : int, optional
        As for :func:`read_image_header`.

    Returns
    -------
    ndarray
        ``(Y, X)`` labels in the stored type (uint8, uint16 or uint32).

    Raises
    ------
    ImageReadError
        As :func:`read_image`, or if the labels are of another pixel type,
        have more than one channel, or are stored as JPEG.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "m_cp_masks.tif"
    >>> labels = np.zeros((8, 8), int)
    >>> labels[:2, :2] = [[0, 1], [70000, 1]]
    >>> write_label_image(path, labels)
    >>> read_label_image(path, max_pixels=MAX_FIELD_PIXELS)[:2, :2]
    array([[    0,     1],
           [70000,     1]], dtype=uint32)
    """
    info = _open_image(Path(path), _Reading(decode=True, max_pixels=max_pixels, max_bytes=max_bytes, labels=True))
    if info.n_channels != 1:
        raise ImageReadError(f"{info.path}: holds {info.n_channels} channels; a label image has one")
    if info.lossy:
        raise ImageReadError(f"{info.path}: a label image stored as JPEG; lossy compression changes labels")
    assert info.pixels is not None
    return info.pixels[0]


def write_label_image(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write a label image as TIFF, uint16 unless the labels need uint32.

    Parameters
    ----------
    path : path
        Destination file.
    labels : ndarray of int
        Label image (0 = background).
    """
    import tifffile

    dtype = np.uint16 if labels.max(initial=0) < 2**16 else np.uint32
    tifffile.imwrite(path, labels.astype(dtype), compression="zlib")


def format_bytes(size: float) -> str:
    """A memory size as messages write it, in binary units.

    Examples
    --------
    >>> format_bytes(277_000), format_bytes(20.6 * 2**30)
    ('270.5 KiB', '20.6 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def format_shape(shape: tuple[int, ...]) -> str:
    """A shape as messages write it.

    Examples
    --------
    >>> format_shape((6, 7))
    '6x7'
    """
    return "x".join(str(s) for s in shape)


# --------------------------------------------------------------------------- decoding


def _open_image(path: Path, reading: _Reading) -> ImageInfo:
    """Read one file's header (and pixels if ``decode``) into an ``ImageInfo``.

    Header and pixel reading share this code so that a directory's grouping
    (headers only) and its reading can never disagree about a file's layout.
    """
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageReadError(f"cannot read image {path}: {error.strerror or error}") from None
    if size == 0:
        raise ImageReadError(f"cannot read image {path}: the file is empty")
    opener = _open_tiff if path.suffix.lower() in TIFF_SUFFIXES else _open_pil
    try:
        return opener(path, reading)
    except ImageReadError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means an unreadable file
        raise ImageReadError(f"cannot read image {path}: {_decoder_message(error)}") from None


# A bytes literal a decoder quotes from the file, with what names it: ": header=b'root'".
_QUOTED_BYTES = re.compile(r"""[:,]?\s*(\w+=)?b(['"]).*?(?<!\\)\2""")


def _decoder_message(error: Exception) -> str:
    """A decoder's error as one printable line, without the file's bytes it quotes.

    Examples
    --------
    >>> _decoder_message(ValueError("not a TIFF file: header=b'root'"))
    'not a TIFF file'
    """
    message = " ".join(_QUOTED_BYTES.sub("", str(error)).split())
    return "".join(c if c.isprintable() else "?" for c in message) or type(error).__name__


@dataclass(frozen=True)
class _Reading:
    """How one file is to be read: what the decoders need besides the path."""

    decode: bool
    max_pixels: int
    max_bytes: int | None
    labels: bool

    @property
    def dtypes(self) -> tuple[np.dtype, ...]:
        return LABEL_DTYPES if self.labels else IMAGE_DTYPES


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


def _open_tiff(path: Path, reading: _Reading) -> ImageInfo:
    import tifffile

    chain = _BrokenPageChain()
    tifffile_logger = logging.getLogger("tifffile")
    tifffile_logger.addHandler(chain)
    try:
        return _read_tiff(tifffile, path, reading, chain)
    finally:
        tifffile_logger.removeHandler(chain)


def _read_tiff(tifffile, path: Path, reading: _Reading, chain: _BrokenPageChain) -> ImageInfo:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if chain.broken:
            raise ImageReadError(f"cannot read image {path}: the file is truncated (a page lies past its end)")
        shape, axes = tuple(series.shape), series.axes
        page = series.pages[0] if series.pages else tif.pages[0]
        photometric = int(getattr(page, "photometric", 0) or 0)
        extrasamples = tuple(int(e) for e in (getattr(page, "extrasamples", ()) or ()))
        # 1, 2 = associated / unassociated alpha; see module notes on shaped files.
        has_alpha = photometric == 2 and any(e in (1, 2) for e in extrasamples) and not tif.is_shaped
        if series.dtype is None or not shape or 0 in shape:  # tifffile reads a tag-less page as float64 ()
            raise ImageReadError(f"cannot read image {path}: the TIFF holds no image data")
        dtype = _native(np.dtype(series.dtype))
        _check_dtype(path, dtype, reading.dtypes)
        shape, axes = _squeeze_leading(shape, axes)
        layout = _layout(path, shape, axes)
        _check_size(path, _plane_shape(shape, layout), layout[1], dtype, reading)
        _check_complete(path, series, tif.filehandle.size)
        pixels = None
        if reading.decode:
            data = np.asarray(series.asarray()).reshape(shape)
            pixels = _check_finite(path, _to_cyx(data.astype(dtype, copy=False), layout))
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
# A palette label image's indices are its labels; the palette only colours them.
_PALETTE_INDICES = {"P": ("uint8", 1, False, None), "PA": ("uint8", 2, True, None)}


def _open_pil(path: Path, reading: _Reading) -> ImageInfo:
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        if mode in _PALETTE_INDICES and reading.labels:
            entry = _PALETTE_INDICES[mode]
        elif mode in _PALETTE_INDICES:
            entry = ("uint8", 1, False, "L") if _palette_is_grey(image) else ("uint8", 3, False, "RGB")
        elif mode in _PIL_MODES:
            entry = _PIL_MODES[mode]
        else:
            raise ImageReadError(f"{path}: unsupported image mode {mode}")
        dtype_name, stored, has_alpha, convert = entry
        dtype = np.dtype(dtype_name)
        _check_dtype(path, dtype, reading.dtypes)
        shape = (image.size[1], image.size[0])
        layout = ("last", stored) if stored > 1 else ("grey", 1)
        _check_size(path, shape, stored, dtype, reading)
        pixels = None
        if reading.decode:
            data = np.asarray(image.convert(convert) if convert else image)
            pixels = _check_finite(path, _to_cyx(data.astype(_native(data.dtype), copy=False), layout))
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
) -> ImageInfo:
    _, n_channels = layout
    if has_alpha and n_channels > 1:
        n_channels -= 1
        if pixels is not None:
            pixels = pixels[:n_channels]
    yx = _plane_shape(shape, layout)
    if pixels is not None and pixels.shape[1:] != yx:  # a header that lies about the pixels
        raise ImageReadError(f"cannot read image {path}: header says {yx} but pixels are {pixels.shape[1:]}")
    return ImageInfo(path, yx, n_channels, dtype, lossy, pixels)  # type: ignore[arg-type]


def _plane_shape(shape: tuple[int, ...], layout: tuple[str, int]) -> tuple[int, ...]:
    kind, _ = layout
    return tuple(shape) if kind == "grey" else tuple(shape[:2]) if kind == "last" else tuple(shape[1:])


def _check_size(path: Path, yx: tuple[int, ...], channels: int, dtype: np.dtype, reading: _Reading) -> None:
    """Refuse, from the header, a plane too small for Cellpose or too large for the limits (module notes).

    ``channels`` are those stored, alpha included: the decoder makes them all.
    """
    if min(yx) < MIN_SIDE:
        raise ImageReadError(f"{path}: a {format_shape(yx)} image; images must be at least {MIN_SIDE} pixels a side")
    pixels = math.prod(yx)
    # The messages name the settings the platform takes the limits from (mantle_assets.settings).
    if pixels > reading.max_pixels:
        raise ImageReadError(
            f"{path}: {format_shape(yx)} = {pixels} pixels per channel exceeds the limit of {reading.max_pixels} "
            f"(MANTLE_MAX_FIELD_PIXELS); split the image into tiles"
        )
    needed = pixels * channels * (2 * dtype.itemsize + 4)
    if reading.max_bytes is not None and needed > reading.max_bytes:
        raise ImageReadError(
            f"{path}: {format_shape(yx)} x {channels} channel(s) of {dtype} takes {format_bytes(needed)} to read and "
            f"prepare, more than the memory budget of {format_bytes(reading.max_bytes)} (MANTLE_MAX_IMAGE_BYTES); "
            f"split the image into tiles"
        )


def _check_finite(path: Path, pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype.kind == "f":
        bad = pixels.size - np.count_nonzero(np.isfinite(pixels))
        if bad:
            raise ImageReadError(
                f"{path}: {bad} of {pixels.size} pixel values are NaN or infinite; replace them (e.g. with 0) "
                f"before registering the images"
            )
    return pixels


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
        raise ImageReadError(
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
        raise ImageReadError(
            f"{path}: image of shape {shape} has {len(shape)} dimensions; "
            f"expected (Y, X), (Y, X, C) or (C, Y, X) with C <= {MAX_CHANNELS}"
        )
    first, last = shape[0], shape[-1]
    if "Z" in axes or "T" in axes:
        kind = "z" if "Z" in axes else "time"
        raise ImageReadError(
            f"{path}: shape {shape} looks like a 3-D stack ({kind} axis in the file's metadata), not channels"
        )
    if axes.endswith("S") or (last <= MAX_CHANNELS and last <= first and not axes.startswith(("C", "S"))):
        kind, n = "last", last
    else:
        kind, n = "first", first
    if n > MAX_CHANNELS:
        raise ImageReadError(
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


def _check_dtype(path: Path, dtype: np.dtype, accepted: tuple[np.dtype, ...]) -> None:
    if dtype not in accepted:
        name = "bool (1-bit)" if dtype == np.bool_ else str(dtype)
        names = [str(d) for d in accepted]
        expected = f"{', '.join(names[:-1])} or {names[-1]}"
        raise ImageReadError(f"{path}: unsupported pixel type {name}; expected {expected}")


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=")
