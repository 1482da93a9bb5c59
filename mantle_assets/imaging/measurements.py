"""Per-object measurements of a segmented field: shape and nucleus/cytoplasm intensities.

The cytoplasm of a nucleus is either the whole cell that holds it minus the
nuclei (when a cell segmentation exists) or a ring grown around the nucleus.
Nucleus/cytoplasm mean ratios of a reporter channel are the usual read-out of a
translocation assay such as NF-kB (BBBC014).

Decisions worth knowing
-----------------------
* Without cells, the ring comes from :func:`skimage.segmentation.expand_labels`,
  which splits contested background between neighbours by distance, so a ring
  never reaches into a neighbour's territory or nucleus.
* With cells, a nucleus takes the cell that covers most of it. When several
  nuclei take the same cell (a binucleate cell, or a cell under-segmented),
  only the nucleus that overlaps it most gets its cytoplasm; the others get an
  empty cytoplasm and so a NaN ratio, rather than sharing pixels silently.
* Nuclear pixels are never cytoplasm, whichever nucleus they belong to.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

__all__ = ["cytoplasm_labels", "measure_objects"]


def cytoplasm_labels(nuclei: np.ndarray, *, cells: np.ndarray | None = None, ring_width: int = 5) -> np.ndarray:
    """Label image of each nucleus's cytoplasm, labelled as its nucleus.

    Parameters
    ----------
    nuclei : ndarray of int, (Y, X)
        Nucleus labels, 0 = background.
    cells : ndarray of int, (Y, X), optional
        Whole-cell labels, 0 = background; their ids need not match the nuclei.
    ring_width : int
        Width in pixels of the ring grown around each nucleus when ``cells`` is
        not given.

    Returns
    -------
    ndarray, (Y, X), dtype of ``nuclei``
        Cytoplasm labels, 0 where no cytoplasm.

    Examples
    --------
    >>> nuclei = np.zeros((1, 7), dtype=int)
    >>> nuclei[0, 3] = 1
    >>> cytoplasm_labels(nuclei, ring_width=2).tolist()
    [[0, 1, 1, 0, 1, 1, 0]]
    >>> cells = np.array([[0, 0, 9, 9, 9, 9, 0]])
    >>> cytoplasm_labels(nuclei, cells=cells).tolist()
    [[0, 0, 1, 0, 1, 1, 0]]
    """
    from skimage.segmentation import expand_labels

    nuclei = np.asarray(nuclei)
    if cells is None:
        if ring_width < 0:
            raise ValueError(f"ring_width must be at least 0, not {ring_width}")
        grown = expand_labels(nuclei, distance=ring_width)
        return np.where(nuclei == 0, grown, 0).astype(nuclei.dtype, copy=False)

    cells = np.asarray(cells)
    if cells.shape != nuclei.shape:
        raise ValueError(f"cells have shape {cells.shape}, nuclei have shape {nuclei.shape}")
    overlap = (nuclei > 0) & (cells > 0)
    pairs, counts = np.unique(np.stack([nuclei[overlap], cells[overlap]]), axis=1, return_counts=True)
    nucleus_ids, cell_ids = pairs
    # Largest overlap first; ids break ties so the result does not depend on sort stability.
    order = np.lexsort((cell_ids, nucleus_ids, -counts))
    first_per_nucleus = order[np.unique(nucleus_ids[order], return_index=True)[1]]
    first_per_cell = first_per_nucleus[np.unique(cell_ids[first_per_nucleus], return_index=True)[1]]

    owner = np.zeros(int(cells.max(initial=0)) + 1, dtype=nuclei.dtype)
    owner[cell_ids[first_per_cell]] = nucleus_ids[first_per_cell]
    return np.where(nuclei == 0, owner[cells], 0).astype(nuclei.dtype, copy=False)


def measure_objects(
    nuclei: np.ndarray,
    channels: Mapping[str, np.ndarray],
    *,
    cells: np.ndarray | None = None,
    ring_width: int = 5,
) -> pd.DataFrame:
    """One row per nucleus: shape, and intensities of each channel in nucleus and cytoplasm.

    Parameters
    ----------
    nuclei : ndarray of int, (Y, X)
        Nucleus labels, 0 = background.
    channels : mapping of str to ndarray, (Y, X)
        Intensity images by name; the name prefixes the intensity columns.
    cells : ndarray of int, (Y, X), optional
        Whole-cell labels; see :func:`cytoplasm_labels`.
    ring_width : int
        Cytoplasm ring width in pixels when ``cells`` is not given.

    Returns
    -------
    DataFrame
        ``label``, ``area``, ``centroid_y``, ``centroid_x``, ``eccentricity``,
        ``solidity``, ``cytoplasm_area`` and, for each channel ``C``,
        ``C_nucleus_mean``, ``C_nucleus_integrated``, ``C_cytoplasm_mean``,
        ``C_cytoplasm_integrated`` and ``C_ratio`` (nucleus mean over
        cytoplasm mean; NaN where the cytoplasm is empty or its mean is 0).

    Raises
    ------
    ValueError
        If ``nuclei`` is not 2-D or a channel's shape differs from it.

    Examples
    --------
    >>> nuclei = np.zeros((5, 5), dtype=int)
    >>> nuclei[2, 2] = 1
    >>> table = measure_objects(nuclei, {"nfkb": np.where(nuclei > 0, 6.0, 2.0)}, ring_width=1)
    >>> int(table.loc[0, "cytoplasm_area"]), float(table.loc[0, "nfkb_ratio"])
    (4, 3.0)
    """
    from scipy import ndimage
    from skimage.measure import regionprops_table

    nuclei = np.asarray(nuclei)
    if nuclei.ndim != 2:
        raise ValueError(f"nuclei must be a 2-D label image, not {nuclei.ndim}-D")
    for name, image in channels.items():
        if np.shape(image) != nuclei.shape:
            raise ValueError(f"channel {name!r} has shape {np.shape(image)}, nuclei have shape {nuclei.shape}")

    shape = pd.DataFrame(
        regionprops_table(nuclei, properties=("label", "area", "centroid", "eccentricity", "solidity"))
    ).rename(columns={"centroid-0": "centroid_y", "centroid-1": "centroid_x"})
    labels = shape["label"].to_numpy()
    cytoplasm = cytoplasm_labels(nuclei, cells=cells, ring_width=ring_width)
    nucleus_area = shape["area"].to_numpy(dtype=float)
    cytoplasm_area = np.bincount(cytoplasm.ravel(), minlength=int(nuclei.max(initial=0)) + 1)[labels]

    columns: dict[str, np.ndarray] = {"cytoplasm_area": cytoplasm_area}
    for name, image in channels.items():
        image = np.asarray(image, dtype=np.float64)
        nucleus_sum = np.asarray(ndimage.sum_labels(image, nuclei, index=labels), dtype=float)
        cytoplasm_sum = np.asarray(ndimage.sum_labels(image, cytoplasm, index=labels), dtype=float)
        nucleus_mean = nucleus_sum / nucleus_area
        cytoplasm_mean = np.divide(
            cytoplasm_sum, cytoplasm_area, out=np.full(labels.shape, np.nan), where=cytoplasm_area > 0
        )
        ratio = np.divide(
            nucleus_mean, cytoplasm_mean, out=np.full(labels.shape, np.nan), where=np.nan_to_num(cytoplasm_mean) != 0
        )
        columns |= {
            f"{name}_nucleus_mean": nucleus_mean,
            f"{name}_nucleus_integrated": nucleus_sum,
            f"{name}_cytoplasm_mean": cytoplasm_mean,
            f"{name}_cytoplasm_integrated": cytoplasm_sum,
            f"{name}_ratio": ratio,
        }
    return pd.concat([shape, pd.DataFrame(columns, index=shape.index)], axis=1)
