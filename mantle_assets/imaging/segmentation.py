"""The Cellpose wrapper: Mantle's pipeline parameters in, label images out.

Mantle's parameters keep Mantle's meanings: ``cytoplasm_channel`` is the
channel to segment (0 = grayscale, c >= 1 = the c-th channel of a field, so
1/2/3 = red/green/blue in RGB files), ``nuclei_channel`` the optional nuclear
channel (0 = none); equal values mean nuclei-only segmentation of that channel.
"""

from __future__ import annotations

import logging
import math
import numbers
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import fastremap
import numpy as np
from scipy import ndimage

from mantle_assets.imaging.io import format_bytes, format_shape
from mantle_assets.imaging.precision import run_network_in

MIN_ESTIMATED_DIAMETER = 5.0

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ParameterError(ValueError):
    """A pipeline parameter with an unusable value; the message names it."""


def parse_diameter(value: str | float | int | None) -> float | None:
    """Read the ``diameter`` parameter: pixels, or ``"None"`` for automatic estimation.

    Examples
    --------
    >>> parse_diameter("None") is None
    True
    >>> parse_diameter("12.5")
    12.5
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    try:
        diameter = float(value)
    except (TypeError, ValueError):
        raise ParameterError(
            f"diameter must be a number of pixels or 'None', got {value!r}"
        ) from None
    if not math.isfinite(diameter) or diameter <= 0:
        raise ParameterError(f"diameter must be a positive number of pixels, got {value!r}")
    return diameter


def check_channels(nuclei_channel: int, cytoplasm_channel: int, n_channels: int | None = None) -> None:
    """Refuse channel numbers that are not whole numbers >= 0, or beyond the images' channels.

    Parameters
    ----------
    nuclei_channel, cytoplasm_channel : int
        Mantle channel parameters: 0, or c >= 1 for the c-th channel of a field.
    n_channels : int, optional
        Channels the images have; when given, numbers must not exceed it.

    Raises
    ------
    ParameterError
        One line naming the parameter.

    Examples
    --------
    >>> check_channels(5, 5, n_channels=5)
    >>> try:
    ...     check_channels(True, 1)
    ... except ParameterError as error:
    ...     print(error)
    nuclei_channel must be a channel number (0, or c >= 1 for the c-th channel of a field), got True
    """
    for name, value in (("nuclei_channel", nuclei_channel), ("cytoplasm_channel", cytoplasm_channel)):
        # bool is an Integral, but True is a mistake, not channel 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ParameterError(
                f"{name} must be a channel number (0, or c >= 1 for the c-th channel of a field), got {value!r}"
            )
        if n_channels is not None and value > n_channels:
            raise ParameterError(
                f"{name}={value} but the images have {n_channels} channel(s)"
            )


def resolve_channel(
    value: int | str,
    channel_names: Sequence[str] | None,
    channel_labels: Sequence[str],
    parameter: str = "channel",
) -> int:
    """Turn a channel given by number or by name into its channel number.

    Parameters
    ----------
    value : int or str
        A number, a number as text, or a channel name. A name is matched
        (ignoring case, whole name) against ``channel_names`` first, then
        against ``channel_labels``.
    channel_names : sequence of str, optional
        The names the user gave the channels, in channel order (``NFkB``, ``DNA``).
    channel_labels : sequence of str
        The channels' labels found in the file names (``w1``, ``Channel2``, ``DAPI``).
    parameter : str
        The parameter's name, for the error message.

    Returns
    -------
    int
        ``value`` itself when it is an int (checked by :func:`check_channels`, not
        here), else the number it writes or the (1-based) channel it names.

    Raises
    ------
    ParameterError
        One line naming the parameter and listing the channels, if the name is
        no channel's or more than one channel's.

    Examples
    --------
    >>> resolve_channel("dna", ["NFkB", "DNA"], ["Channel1", "Channel2"], "nuclei_channel")
    2
    >>> resolve_channel("w1", None, ["w1", "w2"]), resolve_channel(" 3 ", None, ["1", "2", "3"])
    (1, 3)
    >>> try:
    ...     resolve_channel("DAPI", ["NFkB", "DNA"], ["Channel1", "Channel2"], "nuclei_channel")
    ... except ParameterError as error:
    ...     print(error)
    nuclei_channel='DAPI' names no channel; the channels are 1 NFkB (Channel1), 2 DNA (Channel2)
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if re.fullmatch(r"[+-]?\d+", text, re.ASCII):
        return int(text)
    for names in (channel_names or (), channel_labels):
        matches = [index for index, name in enumerate(names, start=1) if name.casefold() == text.casefold()]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ParameterError(
                f"{parameter}={value!r} is ambiguous: it names channels {' and '.join(map(str, matches))}; "
                f"the channels are {_describe_channels(channel_names, channel_labels)}"
            )
    raise ParameterError(
        f"{parameter}={value!r} names no channel; the channels are {_describe_channels(channel_names, channel_labels)}"
    )


def numbered_channels(
    parameters: Mapping, channel_names: Sequence[str] | None, channel_labels: Sequence[str]
) -> dict:
    """Segmentation parameters with ``nuclei_channel`` and ``cytoplasm_channel`` as numbers.

    Parameters
    ----------
    parameters : mapping
        Parameter name -> value; the channels may be numbers, numbers as text
        or channel names (see :func:`resolve_channel`). Unset (None) ones stay unset.
    channel_names, channel_labels : sequence of str
        As for :func:`resolve_channel`.

    Returns
    -------
    dict
        A copy of ``parameters`` with the channels resolved.

    Examples
    --------
    >>> numbered_channels({"nuclei_channel": "dapi", "diameter": "12"}, None, ["FITC", "DAPI"])
    {'nuclei_channel': 2, 'diameter': '12'}
    """
    return dict(parameters) | {
        name: resolve_channel(parameters[name], channel_names, channel_labels, name)
        for name in ("nuclei_channel", "cytoplasm_channel")
        if parameters.get(name) is not None
    }


def _describe_channels(channel_names: Sequence[str] | None, channel_labels: Sequence[str]) -> str:
    """``1 NFkB (Channel1), 2 DNA (Channel2)``: each channel's number, name and file-name label."""
    described = []
    for number, label in enumerate(channel_labels, start=1):
        name = channel_names[number - 1] if channel_names else label
        # One-file-per-field labels are the numbers themselves; a label equal to the name says nothing more.
        extra = "" if label in (name, str(number)) else f" ({label})"
        described.append(f"{number}" if name == str(number) else f"{number} {name}{extra}")
    return ", ".join(described) or "none"


def select_channels(stack: np.ndarray, nuclei_channel: int, cytoplasm_channel: int) -> np.ndarray:
    """Build Cellpose's input from a ``(C, Y, X)`` field.

    Returns a ``(Y, X)`` image when one channel is segmented (grayscale or
    nuclei-only), else ``(2, Y, X)``: the channel to segment, then the nuclei.

    Examples
    --------
    >>> stack = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 3.0)])
    >>> float(select_channels(stack, 2, 2)[0, 0])
    3.0
    >>> float(select_channels(stack, 0, 0)[0, 0])
    2.0
    >>> select_channels(stack, 2, 1).shape
    (2, 2, 2)
    """
    check_channels(nuclei_channel, cytoplasm_channel, stack.shape[0])
    stack = stack.astype(np.float32, copy=False)
    target = stack.mean(axis=0) if cytoplasm_channel == 0 else stack[cytoplasm_channel - 1]
    if nuclei_channel in (0, cytoplasm_channel):
        return target
    return np.stack([target, stack[nuclei_channel - 1]])


# Host memory (numpy arrays, with a GPU too) Cellpose 3.1.1 holds while it segments one 2-D field. The network runs
# on the field rescaled by diam_mean / diameter: CellposeModel.eval -> _run_net -> core.run_net keeps, per pixel of
# the rescaled field (float32, 2 input and 3 output channels, 224-pixel tiles overlapping by 10 % a side, ~1.44 tile
# pixels per pixel), the resized and padded input (8 + 8 B), the tiles and their batch (IMG, IMGa: 2 x 11.5 B), the
# output tiles (ya: 17 B), the averaged output and its float64 weights (average_tiles: 12 + 8 B) and the output
# (yf: 12 B), not all at once: up to ~80 B. The output is resized back to the field, and dynamics.compute_masks
# works at the field's size (flows, foreground indices, final positions, histogram), after run_net's arrays are
# freed. Measured (peak RSS above the loaded model, mantle-nuclei-v1 on the CPU of a 2-core box; BBBC014 DNA tiled):
# 1024^2 at scale 1: 494 MiB, 2048^2 at scale 1: 734 MiB (3271 objects; zeros: 801 MiB), 1024^2 at scale 2:
# 701 MiB. Hence 69 B per rescaled pixel, 11 B per field pixel, and ~0.4 GiB for a batch of 8 tiles through the
# network, which depends on neither and, with a GPU, lives on the GPU. At a scale below 1 the masks, at the field's
# size, take what the network would have at scale 1 (80 B a pixel) at most: the field counts as rescaled then.
CELLPOSE_BYTES_PER_RESCALED_PIXEL = 70
CELLPOSE_BYTES_PER_FIELD_PIXEL = 12


def cellpose_memory(shape: tuple[int, int], scale: float) -> int:
    """Host memory Cellpose takes to segment a field, in bytes (see the factors above).

    Parameters
    ----------
    shape : (int, int)
        ``(Y, X)`` of the field.
    scale : float
        Cellpose's rescaling, ``diam_mean / diameter``.

    Examples
    --------
    >>> format_bytes(cellpose_memory((256, 256), 17 / 0.3))
    '13.7 GiB'
    """
    pixels = shape[0] * shape[1]
    return int(pixels * (CELLPOSE_BYTES_PER_FIELD_PIXEL + CELLPOSE_BYTES_PER_RESCALED_PIXEL * max(scale, 1) ** 2))


def check_cellpose_memory(
    field: str, shape: tuple[int, int], diameter: float, diam_mean: float, max_bytes: int, *, source: str = "given"
) -> None:
    """Refuse a diameter at which Cellpose would need more memory than ``max_bytes`` for a field.

    Cellpose rescales a field by ``diam_mean / diameter`` before its network
    sees it, so a small diameter makes a small field huge (0.3 pixels: a
    256 x 256 field becomes 14507 x 14507).

    Parameters
    ----------
    field : str
        The field's name, for the message.
    shape : (int, int)
        ``(Y, X)`` of the field.
    diameter : float
        The diameter it is segmented at, in pixels.
    diam_mean : float
        The model's own object diameter.
    max_bytes : int
        The memory budget.
    source : {"given", "model", "estimated"}
        Where ``diameter`` comes from, for the message: the ``diameter``
        parameter, or with ``diameter=None`` the model's own (where the
        estimate starts) or the estimate.

    Raises
    ------
    ParameterError
        One line naming ``diameter``, the field, its size, the memory needed
        and the budget, and the smallest diameter that fits, if any.

    Examples
    --------
    >>> try:
    ...     check_cellpose_memory("A01", (256, 256), 0.3, 17.0, 8 * 2**30)
    ... except ParameterError as error:
    ...     print(error)  # doctest: +NORMALIZE_WHITESPACE
    diameter=0.3 px: Cellpose would rescale field A01 (256x256) by 56.7 to 14506x14506 and need about 13.7 GiB,
    more than the memory budget of 8.0 GiB (MANTLE_MAX_IMAGE_BYTES); the smallest diameter that fits is 0.4 px
    """
    scale = diam_mean / diameter
    needed = cellpose_memory(shape, scale)
    if needed <= max_bytes:
        return
    pixels = shape[0] * shape[1]
    # The largest scale**2 that fits; below 1 none does, since a smaller scale saves nothing (see the factors).
    room = (max_bytes / pixels - CELLPOSE_BYTES_PER_FIELD_PIXEL) / CELLPOSE_BYTES_PER_RESCALED_PIXEL
    advice = (
        f"the smallest diameter that fits is {math.ceil(10 * diam_mean / math.sqrt(room)) / 10:g} px"
        if room >= 1 else "split the image into tiles"
    )
    given = {
        "given": f"diameter={diameter:g} px:",
        "model": f"diameter=None: estimating it from the model's {diameter:g} px,",
        "estimated": f"diameter=None: at the estimated {diameter:.1f} px,",
    }[source]
    rescaled = format_shape(tuple(int(side * scale) for side in shape))
    raise ParameterError(
        f"{given} Cellpose would rescale field {field} ({format_shape(shape)}) by {scale:.1f} to {rescaled} and "
        f"need about {format_bytes(needed)}, more than the memory budget of {format_bytes(max_bytes)} "
        f"(MANTLE_MAX_IMAGE_BYTES); {advice}"
    )


def with_smaller_batches_on_oom(run: Callable[[int], T], batch_size: int) -> T:
    """Call ``run(batch_size)``, halving the batch size whenever the GPU runs out of memory.

    A field that does not fit at the configured batch size on a busy or small
    GPU still fits at a smaller one; only when a single tile does not fit is
    the error raised.

    Parameters
    ----------
    run : callable
        Evaluates with the batch size it is given.
    batch_size : int
        The batch size to try first.

    Returns
    -------
    Whatever ``run`` returns.

    Raises
    ------
    torch.OutOfMemoryError
        If even a batch of one does not fit.
    """
    import torch

    while True:
        try:
            return run(batch_size)
        except torch.OutOfMemoryError:
            if batch_size <= 1:
                raise
            torch.cuda.empty_cache()
            batch_size //= 2
            logger.warning("out of GPU memory: retrying with batch_size=%d", batch_size)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and scalars and plain containers, nothing that could run code."""

    ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_size_parameters(path: str | Path) -> dict:
    """Read a Cellpose size model (``*_size.npy``) without unpickling anything but arrays.

    ``cellpose.train.train_size`` saves a dict of arrays as a pickled object
    array, and Cellpose reads it back with ``allow_pickle=True``, which would run
    whatever code a doctored file holds. Model files come from users, so
    this reader accepts numpy arrays and scalars only.

    Returns
    -------
    dict
        ``A``, ``smean``, ``ymean`` and ``diam_mean``.

    Raises
    ------
    ValueError
        One line naming the file, if it holds anything else.
    """
    try:
        with open(path, "rb") as stream:
            version = np.lib.format.read_magic(stream)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise pickle.UnpicklingError(f"unsupported .npy version {version}")
            _, _, dtype = read_header[version](stream, max_header_size=10_000)
            if not dtype.hasobject:
                raise pickle.UnpicklingError(f"expected a pickled dict, found an array of {dtype}")
            params = _ArraysOnlyUnpickler(stream).load().item()
        missing = {"A", "smean", "ymean", "diam_mean"} - set(params)
        if missing:
            raise pickle.UnpicklingError(f"missing {', '.join(sorted(missing))}")
    except (pickle.UnpicklingError, ValueError, AttributeError, EOFError) as error:
        raise ValueError(f"{path}: not a Cellpose size model ({str(error).splitlines()[0]})") from None
    return params


def fill_holes_and_remove_small_masks(masks: np.ndarray, min_size: int) -> np.ndarray:
    """Fill each mask's holes and remove masks under ``min_size`` pixels, whatever numbers the labels have.

    The steps of Cellpose's ``utils.fill_holes_and_remove_small_masks`` (remove
    small masks, fill holes, remove the masks still small, renumber), with
    each mask's pixels counted by its label. Cellpose 3.1.1.3 takes the count
    of the k-th label present for label k's, which holds only for labels
    1..N; ``dynamics.remove_bad_flow_masks`` leaves gaps, so after a mask
    rejected for its flows Cellpose removes, for a small mask above the gap,
    the mask numbered like its rank, whatever its size (the small one goes in
    a second pass, but the other is lost).
    :class:`CellposeSegmenter` hence asks Cellpose for ``min_size=-1``, which
    fills holes and renumbers but removes nothing, and calls this.

    Parameters
    ----------
    masks : ndarray
        2-D or 3-D label image, 0 = background; labels need not be consecutive.
    min_size : int
        Masks with fewer pixels are removed; 0 keeps every mask.

    Returns
    -------
    ndarray
        A new label image of the same dtype, masks numbered 1..N in the order they first occur, row by row.

    Examples
    --------
    >>> masks = np.zeros((6, 12), np.uint16)
    >>> masks[:, :4], masks[:, 5:9], masks[0, 11] = 2, 4, 7  # labels 1, 3, 5 and 6 missing
    >>> masks[2, 1] = 0  # a hole
    >>> filtered = fill_holes_and_remove_small_masks(masks, min_size=2)
    >>> labels, counts = np.unique(filtered, return_counts=True)
    >>> labels.tolist(), counts.tolist()  # background, then the two large masks, the hole filled
    ([0, 1, 2], [24, 24, 24])
    """
    masks = _without_masks_under(masks, min_size)
    for label, box in enumerate(ndimage.find_objects(masks), start=1):
        if box is not None:
            masks[box][ndimage.binary_fill_holes(masks[box] == label)] = label
    masks = _without_masks_under(masks, min_size)
    # Numbered as Cellpose numbers them (in the order the masks first occur, row by row); in place, renumber keeps
    # the dtype (the array it returns may be narrower).
    fastremap.renumber(masks, in_place=True)
    return masks


def _without_masks_under(masks: np.ndarray, min_size: int) -> np.ndarray:
    """A copy of ``masks`` without the masks of fewer than ``min_size`` pixels."""
    small = np.bincount(masks.ravel()) < min_size
    small[0] = False
    return np.where(small[masks], 0, masks).astype(masks.dtype, copy=False)


@dataclass(frozen=True)
class SegmentationSettings:
    """Cellpose evaluation options besides the channels (Cellpose's defaults).

    Values Cellpose would run with but that make no sense are refused when the
    settings are made, before any work: each would otherwise cost a whole
    segmentation and give 0 objects (``batch_size`` < 1) or fail only when the
    results are recorded (NaN thresholds).

    Raises
    ------
    ParameterError
        One line naming the parameter: ``diameter`` not a positive number or
        None, ``flow_threshold`` not a finite number >= 0 (0 turns Cellpose's
        flow check off), ``cellprob_threshold`` not finite, ``min_size`` not a
        whole number >= 0 (0 keeps every object), ``batch_size`` not a whole
        number >= 1.

    Examples
    --------
    >>> try:
    ...     SegmentationSettings(batch_size=-3)
    ... except ParameterError as error:
    ...     print(error)
    batch_size must be a whole number >= 1 (tiles per network pass), got -3
    """

    diameter: float | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.diameter is not None:
            parse_diameter(self.diameter)
        _check_number("flow_threshold", self.flow_threshold, 0, "a finite number >= 0 (0 turns the flow check off)")
        _check_number("cellprob_threshold", self.cellprob_threshold, -math.inf, "a finite number")
        _check_whole("min_size", self.min_size, 0, "a whole number >= 0 (0 keeps every object)")
        _check_whole("batch_size", self.batch_size, 1, "a whole number >= 1 (tiles per network pass)")


def _check_number(name: str, value, smallest: float, expected: str) -> None:
    # bool is a Real, but a threshold of True is a slip.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < smallest:
        raise ParameterError(f"{name} must be {expected}, got {value!r}")


def _check_whole(name: str, value, smallest: int, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < smallest:
        raise ParameterError(f"{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class SegmentationResult:
    masks: np.ndarray
    diameter: float
    estimated: bool


class CellposeSegmenter:
    """A Cellpose model loaded once and applied to many images.

    Parameters
    ----------
    weights : path
        Cellpose model file.
    builtin_name : str, optional
        Cellpose's name for built-in weights; enables Cellpose's own size
        model for automatic diameters (``size_*.npy`` from its cache).
    gpu : bool, optional
        Use the GPU; default: whenever torch sees one.
    precision : {"auto", "float32", "bfloat16"}
        The network's arithmetic (:func:`mantle_assets.imaging.precision.run_network_in`).

    Notes
    -----
    A process that imports Cellpose through
    :func:`mantle_assets.models.cellpose_import.import_cellpose` first (the
    platform's resources do) loads Cellpose's numba code from a cache instead
    of compiling it.
    """

    def __init__(
        self,
        weights: str | Path,
        *,
        builtin_name: str | None = None,
        gpu: bool | None = None,
        precision: str = "auto",
    ):
        import torch
        from cellpose import models

        use_gpu = torch.cuda.is_available() if gpu is None else gpu
        if builtin_name is not None:
            self.model = models.CellposeModel(gpu=use_gpu, model_type=builtin_name)
        else:
            self.model = models.CellposeModel(gpu=use_gpu, pretrained_model=str(weights))
        self.precision = run_network_in(self.model.net, precision)
        self.diam_mean = float(self.model.diam_mean)
        self.device = str(self.model.device)
        self.size_model = self._size_model(Path(weights), builtin_name)

    def _size_model(self, weights: Path, builtin_name: str | None):
        """Cellpose's size model: its own for built-ins, ``<weights>_size.npy`` for others."""
        from cellpose import models

        if builtin_name is None:
            size_file = weights.with_name(weights.name + "_size.npy")
            if not size_file.is_file():
                return None
            size_model = models.SizeModel(cp_model=self.model)
            size_model.params = load_size_parameters(size_file)
            size_model.diam_mean = size_model.params["diam_mean"]
            return size_model
        if builtin_name not in ("cyto", "cyto2", "cyto3", "nuclei"):
            return None
        try:
            return models.SizeModel(cp_model=self.model, pretrained_size=models.size_model_path(builtin_name))
        except Exception:  # noqa: BLE001 - neither cached nor downloadable
            return None

    def _eval(self, image: np.ndarray, diameter: float, settings: SegmentationSettings) -> np.ndarray:
        channels, channel_axis = ([1, 2], 0) if image.ndim == 3 else ([0, 0], None)

        def evaluate(batch_size: int) -> np.ndarray:
            masks, _, _ = self.model.eval(
                image,
                channels=channels,
                channel_axis=channel_axis,
                diameter=diameter,
                flow_threshold=settings.flow_threshold,
                cellprob_threshold=settings.cellprob_threshold,
                # Cellpose's own size filter deletes the wrong masks (see fill_holes_and_remove_small_masks);
                # at -1 it fills holes only.
                min_size=-1,
                batch_size=batch_size,
            )
            return np.asarray(masks)

        masks = with_smaller_batches_on_oom(evaluate, settings.batch_size)
        return fill_holes_and_remove_small_masks(masks, settings.min_size)

    def estimate_diameter(self, image: np.ndarray, settings: SegmentationSettings = SegmentationSettings()) -> float:
        """Estimate the median object diameter of an image, in pixels.

        Uses Cellpose's size model (style regression, then the median
        diameter of the masks found at that size): Cellpose's own for
        built-ins, ``<weights>_size.npy`` (``cellpose.train.train_size``) for
        trained models. Without one, the image is segmented once at the
        network's own scale (``diam_mean``) and the median diameter of the
        objects found is returned.
        """
        if self.size_model is not None:
            channels, channel_axis = ([1, 2], 0) if image.ndim == 3 else ([0, 0], None)
            diameter, _ = self.size_model.eval(image, channels=channels, channel_axis=channel_axis)
            return max(float(diameter), MIN_ESTIMATED_DIAMETER)
        from cellpose.utils import diameters

        masks = self._eval(image, self.diam_mean, settings)
        if masks.max() == 0:
            return self.diam_mean
        return max(float(diameters(masks)[0]), MIN_ESTIMATED_DIAMETER)

    def segment(
        self,
        image: np.ndarray,
        settings: SegmentationSettings = SegmentationSettings(),
        *,
        max_bytes: int | None = None,
        field: str = "",
    ) -> SegmentationResult:
        """Segment one image prepared by :func:`select_channels`.

        Parameters
        ----------
        image : ndarray
            ``(Y, X)`` or ``(2, Y, X)``.
        settings : SegmentationSettings
            ``diameter=None`` estimates the diameter of this image first.
        max_bytes : int, optional
            The memory budget (:func:`check_cellpose_memory`), checked at the
            diameter used before Cellpose segments; None: no budget.
        field : str
            The field's name, for the budget's message.

        Returns
        -------
        SegmentationResult
            Label image (0 = background), the diameter used and whether it was estimated.

        Raises
        ------
        ParameterError
            If the diameter, given or estimated, needs more than ``max_bytes``.
        """
        estimated = settings.diameter is None
        diameter = self.estimate_diameter(image, settings) if estimated else settings.diameter
        if max_bytes is not None:
            source = "estimated" if estimated else "given"
            check_cellpose_memory(field, image.shape[-2:], diameter, self.diam_mean, max_bytes, source=source)
        return SegmentationResult(self._eval(image, diameter, settings), diameter, estimated)
