"""Whole cells around segmented nuclei: grown on the cytoplasm channel, or matched to a whole-cell model's.

CellProfiler segments a translocation assay in three steps: nuclei
(IdentifyPrimaryObjects), each nucleus grown into its cell on the cytoplasm
channel (IdentifySecondaryObjects, "Propagation") and the cytoplasm as the cell
minus its nucleus (IdentifyTertiaryObjects). :func:`propagate_cells` is the
second step, :func:`cytoplasm_of_cells` the third; :func:`match_nuclei_to_cells`
relates nuclei to cells that a whole-cell model (Cellpose ``cyto3``) found
independently.

Decisions worth knowing
-----------------------
* Foreground is three-class Otsu on the logarithm of the smoothed cytoplasm
  image, the middle class counted as foreground (CellProfiler's Otsu with
  "log transform before thresholding", three classes, middle to foreground).
  Reporter channels span decades: on BBBC014 the stimulated wells hold NF-kB in
  bright nuclei over a cytoplasm only a few grey levels above the background,
  and cells expressing little reporter sit among bright ones. Linear Otsu
  (two classes, or three with the middle class) keeps little more than the
  bright nuclei of a stimulated field (5-8 % of it); two-class Otsu on the
  logarithm misses the dim cells: the cytoplasm grows beyond the nucleus for
  83 % (dose 0) to 91 % (dose 10) of the nuclei, against 95-98 % here.
* Boundaries come from :func:`skimage.segmentation.watershed` seeded with the
  nuclei, restricted to the foreground, on the elevation
  ``1 - intensity + regularization * distance``: the smoothed intensity scaled
  so that its 1st and 99th percentiles are 0 and 1, and the Euclidean distance
  in pixels to the nearest nucleus. The inverted intensity puts the watershed
  line on the dark line between two touching cells itself (a gradient
  magnitude would put it on one of the line's flanks); the distance term makes
  the elevation rise away from every nucleus, so where there is no contrast
  (the dim cytoplasm of stimulated cells) cells meet half-way between their
  nuclei. A dark line of depth ``d`` (in the scaled units) becomes the
  boundary when it lies within ``d / regularization`` pixels of the line
  half-way between the nuclei.
* ``regularization`` plays the part of CellProfiler's regularization factor
  (lambda): 0 follows the intensity alone, large values give the Voronoi
  split by distance. The numbers differ: CellProfiler adds ``lambda`` to the
  squared intensity step of each pixel of a propagation path (intensities
  scaled 0-1 by bit depth), so there a dark line wins within about
  ``2 d / sqrt(lambda)`` pixels of the half-way line.
* A nucleus's pixels always belong to its cell (they seed the watershed),
  even below the threshold, so a nucleus on a dim background gets exactly its
  own pixels. Cells touching the image edge are kept and listed.
* The threshold is the field's own, so it rises where a field has little
  background: a dense crop of an untreated well. On the tests' 160 x 160 crop
  of BBBC014 A01 (rows and columns 200-360, Cellpose nuclei) it is 11.9 where
  the whole field's is 6.8, and 5 of the 31 nuclei, which sit in 6-8 grey
  levels of NF-kB (the crop's cytoplasm: ~35), stay at their nucleus: four
  are fragments of one nucleus in a dark gap between cells, one lies in a dim
  strip. With the treated A12 crop (nuclear NF-kB; 12 of 12 cells larger than
  their nucleus) that is 88 %. Not the cause: the nucleus's own pixels
  (thresholding without them gives 11.6 and the same 26 of 31). Tried without
  moving more than one of the 5: Li on the log (13.5), Triangle (11.7),
  four-class Otsu on the log (9.6), a robust background of the pixels over
  20 px from any nucleus (16.3). Five classes would (8.2, 30 of 31) but put
  the threshold of treated fields at 1.8 over a background of 1.0-1.4, in
  its noise. Whole fields: 94.7 % (A01, 320 of 338), 96.7 % (A12, 206 of 213);
  the plate, with Otsu nuclei, 98.2 % (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NucleiInCells",
    "PropagatedCells",
    "cytoplasm_of_cells",
    "labels_touching_border",
    "match_nuclei_to_cells",
    "propagate_cells",
]

# The maximum over 256 (one grey level of an 8-bit image) keeps the logarithm of black pixels finite. Nothing is
# subtracted first: a background's noise near the minimum would spread over decades and fill a class of its own.
_LOG_OFFSET_FRACTION = 1 / 256


@dataclass(frozen=True)
class PropagatedCells:
    """Cells grown from nuclei by :func:`propagate_cells`.

    Attributes
    ----------
    cells : ndarray of int, (Y, X)
        Cell labels, each cell labelled as its nucleus; 0 = background.
    touching_border : ndarray of int
        Labels of the cells with a pixel on the image's edge, ascending (kept in ``cells``).
    threshold : float
        The foreground threshold applied to the smoothed cytoplasm image, in its intensity units.
    """

    cells: np.ndarray
    touching_border: np.ndarray
    threshold: float


@dataclass(frozen=True)
class NucleiInCells:
    """Nuclei related to independently segmented cells by :func:`match_nuclei_to_cells`.

    Attributes
    ----------
    cells : ndarray of int, (Y, X)
        The cells relabelled as their nucleus, 0 = background: a cell with
        several nuclei takes the label of the one it holds most of; cells
        without a nucleus are left out.
    cell_of_nucleus : dict of int to int
        For each nucleus that overlaps a cell, the input id of the cell that
        holds most of it.
    multinucleate : dict of int to tuple of int
        Input id of each cell that most of two or more nuclei fall in, and
        those nuclei, the one it holds most of first.
    anucleate : tuple of int
        Input ids of the cells that hold the most of no nucleus, ascending.
    touching_border : ndarray of int
        Labels in ``cells`` with a pixel on the image's edge, ascending.
    """

    cells: np.ndarray
    cell_of_nucleus: dict[int, int]
    multinucleate: dict[int, tuple[int, ...]]
    anucleate: tuple[int, ...]
    touching_border: np.ndarray


def _check_labels(name: str, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label image, not {labels.ndim}-D")
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise ValueError(f"{name} must hold labels (integers >= 0), got {labels.dtype} values")
    return labels


def _check_number(name: str, value, smallest: float, *, inclusive: bool = True) -> float:
    # bool is a Real, but a regularization of True is a slip.
    too_small = value < smallest if inclusive else value <= smallest
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or too_small:
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {relation} {smallest}, got {value!r}")
    return float(value)


def labels_touching_border(labels: np.ndarray) -> np.ndarray:
    """Labels with a pixel on the first or last row or column, ascending.

    Examples
    --------
    >>> labels_touching_border(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 2]])).tolist()
    [2]
    """
    labels = np.asarray(labels)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.unique(edge[edge > 0])


def foreground_threshold(image: np.ndarray) -> float:
    """The lower three-class Otsu threshold of ``log(max(image, 0) + max / 256)``, in the image's units.

    Parameters
    ----------
    image : ndarray, (Y, X)
        Intensities (usually smoothed).

    Returns
    -------
    float
        Pixels above it are foreground: the middle and bright classes. With
        fewer than three distinct values above 0, the minimum (all but the
        darkest pixels are foreground; none of a constant image).

    Examples
    --------
    >>> background, dim, bright = np.full((4, 4), 1.0), np.full((4, 4), 8.0), np.full((4, 4), 90.0)
    >>> 1.0 < foreground_threshold(np.concatenate([background, dim, bright])) < 8.0
    True
    """
    from skimage.filters import threshold_multiotsu

    image = np.asarray(image, dtype=np.float64)
    clipped = np.maximum(image, 0)
    if np.unique(clipped).size < 3:
        return float(image.min())
    offset = float(clipped.max()) * _LOG_OFFSET_FRACTION
    return float(np.exp(threshold_multiotsu(np.log(clipped + offset), classes=3)[0]) - offset)


def propagate_cells(
    nuclei: np.ndarray,
    cytoplasm: np.ndarray,
    *,
    threshold: float | None = None,
    threshold_correction: float = 1.0,
    regularization: float = 0.05,
    smoothing: float = 0.75,
) -> PropagatedCells:
    """Grow each nucleus into its cell on a cytoplasm image (CellProfiler's propagation).

    Parameters
    ----------
    nuclei : ndarray of int, (Y, X)
        Nucleus labels, 0 = background.
    cytoplasm : ndarray, (Y, X)
        Intensity image in which cells are brighter than the background.
    threshold : float, optional
        Foreground threshold in the image's intensity units, applied to the
        smoothed image; default: :func:`foreground_threshold` of it
        (three-class Otsu on the logarithm; see the module notes).
    threshold_correction : float
        Factor on the automatic threshold (CellProfiler's threshold correction
        factor): above 1 makes cells smaller. Must be 1 with a manual ``threshold``.
    regularization : float
        Weight of the distance to the nuclei against the intensity, >= 0; a
        dark line of depth ``d`` (image scaled 0-1 between its 1st and 99th
        percentiles) separates two cells if it lies within
        ``d / regularization`` pixels of the line half-way between their
        nuclei. See the module notes for CellProfiler's lambda.
    smoothing : float
        Standard deviation in pixels of the Gaussian smoothing before
        thresholding and flooding. A threshold near the background widens a
        smoothed edge by about 1.4 ``smoothing``: 0.75 keeps drawn cells within
        a pixel (IoU >= 0.9 for cells of radius 18-20) while smoothing enough
        that BBBC014's background noise stays below the threshold (the cell
        grows beyond the nucleus for 95-98 % of its nuclei, as with 1, which
        corresponds to CellProfiler's default scale). At 0.5 the threshold
        of the drawn cells' field falls into its background noise.

    Returns
    -------
    PropagatedCells
        Cells labelled as their nuclei. Every cell holds all of its nucleus's
        pixels and no other nucleus's; a nucleus without foreground around it
        is its own cell.

    Raises
    ------
    ValueError
        One line naming the parameter: images not 2-D or of different shapes,
        ``nuclei`` not integers >= 0, a number out of range, or
        ``threshold_correction`` with a manual ``threshold``.

    Examples
    --------
    >>> nuclei = np.zeros((7, 9), dtype=int)
    >>> nuclei[3, 2], nuclei[3, 5] = 1, 2
    >>> cytoplasm = np.zeros((7, 9))
    >>> cytoplasm[1:6, 1:8] = 10.0
    >>> propagate_cells(nuclei, cytoplasm, smoothing=0).cells[3].tolist()
    [0, 1, 1, 1, 2, 2, 2, 2, 0]
    """
    from scipy import ndimage
    from skimage.filters import gaussian
    from skimage.segmentation import watershed

    nuclei = _check_labels("nuclei", nuclei)
    cytoplasm = np.asarray(cytoplasm)
    if cytoplasm.shape != nuclei.shape:
        raise ValueError(f"cytoplasm has shape {cytoplasm.shape}, nuclei have shape {nuclei.shape}")
    if cytoplasm.dtype.kind not in "biuf":
        raise ValueError(f"cytoplasm must hold numbers, got {cytoplasm.dtype} values")
    regularization = _check_number("regularization", regularization, 0)
    smoothing = _check_number("smoothing", smoothing, 0)
    threshold_correction = _check_number("threshold_correction", threshold_correction, 0, inclusive=False)
    if threshold is not None:
        threshold = _check_number("threshold", threshold, -math.inf)
        if threshold_correction != 1.0:
            raise ValueError(
                f"threshold_correction applies to the automatic threshold; with threshold={threshold} it must be 1"
            )

    smoothed = gaussian(cytoplasm.astype(np.float64), sigma=smoothing, preserve_range=True)
    if threshold is None:
        threshold = foreground_threshold(smoothed) * threshold_correction
    if not nuclei.any():
        return PropagatedCells(np.zeros_like(nuclei), np.zeros(0, dtype=nuclei.dtype), threshold)

    low, high = np.percentile(smoothed, [1, 99])
    scaled = np.clip((smoothed - low) / (high - low), 0, 1) if high > low else np.zeros_like(smoothed)
    distance = ndimage.distance_transform_edt(nuclei == 0)
    elevation = 1 - scaled + regularization * distance
    cells = watershed(elevation, markers=nuclei, mask=(smoothed > threshold) | (nuclei > 0))
    cells = cells.astype(nuclei.dtype, copy=False)
    return PropagatedCells(cells, labels_touching_border(cells), threshold)


def match_nuclei_to_cells(nuclei: np.ndarray, cells: np.ndarray) -> NucleiInCells:
    """Relate nuclei to cells segmented on their own: each nucleus goes to the cell holding most of it.

    Parameters
    ----------
    nuclei : ndarray of int, (Y, X)
        Nucleus labels, 0 = background.
    cells : ndarray of int, (Y, X)
        Whole-cell labels, 0 = background; their ids need not match the nuclei.

    Returns
    -------
    NucleiInCells
        The cells relabelled as their nuclei, and the cells with several
        nuclei or none. Overlaps tie in favour of the smaller id.

    Raises
    ------
    ValueError
        If either is not a 2-D label image or their shapes differ.

    Examples
    --------
    >>> nuclei = np.array([[1, 0, 2, 0, 3, 0, 0]])
    >>> cells = np.array([[7, 7, 7, 0, 8, 0, 9]])
    >>> matched = match_nuclei_to_cells(nuclei, cells)
    >>> matched.cells.tolist(), matched.multinucleate, matched.anucleate
    ([[1, 1, 1, 0, 3, 0, 0]], {7: (1, 2)}, (9,))
    """
    nuclei = _check_labels("nuclei", nuclei)
    cells = _check_labels("cells", cells)
    if cells.shape != nuclei.shape:
        raise ValueError(f"cells have shape {cells.shape}, nuclei have shape {nuclei.shape}")
    overlap = (nuclei > 0) & (cells > 0)
    pairs, counts = np.unique(np.stack([nuclei[overlap], cells[overlap]]), axis=1, return_counts=True)
    nucleus_ids, cell_ids = pairs
    # Largest overlap first; ids break ties so the result does not depend on sort stability.
    order = np.lexsort((cell_ids, nucleus_ids, -counts))
    # Each nucleus's best pair, kept in order of overlap so that a cell's first nucleus is the one it holds most of.
    best_pairs = order[np.sort(np.unique(nucleus_ids[order], return_index=True)[1])]
    cell_of_nucleus = dict(zip(nucleus_ids[best_pairs].tolist(), cell_ids[best_pairs].tolist(), strict=True))
    nuclei_of_cell: dict[int, list[int]] = {}
    for nucleus, cell in cell_of_nucleus.items():
        nuclei_of_cell.setdefault(cell, []).append(nucleus)

    owner = np.zeros(int(cells.max(initial=0)) + 1, dtype=nuclei.dtype)
    for cell, held in nuclei_of_cell.items():
        owner[cell] = held[0]
    relabelled = owner[cells]
    present = np.unique(cells[cells > 0])
    return NucleiInCells(
        cells=relabelled,
        cell_of_nucleus=dict(sorted(cell_of_nucleus.items())),
        multinucleate={cell: tuple(held) for cell, held in sorted(nuclei_of_cell.items()) if len(held) > 1},
        anucleate=tuple(int(cell) for cell in present if cell not in nuclei_of_cell),
        touching_border=labels_touching_border(relabelled),
    )


def cytoplasm_of_cells(cells: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """The cytoplasm: each cell minus every nucleus (CellProfiler's IdentifyTertiaryObjects).

    Parameters
    ----------
    cells : ndarray of int, (Y, X)
        Cell labels, each cell labelled as its nucleus (:func:`propagate_cells`,
        or :attr:`NucleiInCells.cells`).
    nuclei : ndarray of int, (Y, X)
        Nucleus labels.

    Returns
    -------
    ndarray, (Y, X), dtype of ``cells``
        Cytoplasm labelled as its cell; 0 on nuclei and background.

    Examples
    --------
    >>> cytoplasm_of_cells(np.array([[0, 1, 1, 1, 2, 2]]), np.array([[0, 0, 1, 0, 0, 2]])).tolist()
    [[0, 1, 0, 1, 2, 0]]
    """
    cells, nuclei = np.asarray(cells), np.asarray(nuclei)
    if cells.shape != nuclei.shape:
        raise ValueError(f"cells have shape {cells.shape}, nuclei have shape {nuclei.shape}")
    return np.where(nuclei == 0, cells, 0).astype(cells.dtype, copy=False)
