"""Per-object measurements of a segmented field: shape and nucleus/cytoplasm intensities.

The cytoplasm of a nucleus is either the whole cell that holds it minus the
nuclei (when a cell segmentation exists; :mod:`mantle_assets.imaging.cells`) or
a ring grown around the nucleus. Nucleus/cytoplasm mean ratios of a reporter
channel are the usual read-out of a translocation assay such as NF-kB (BBBC014).
A table says which cytoplasm it used in ``table.attrs["cytoplasm"]``:
``"ring"`` or ``"cell"`` (an attribute, not a column: the entity store keeps
numeric columns only).

Decisions worth knowing
-----------------------
* Without cells, the ring comes from :func:`skimage.segmentation.expand_labels`,
  which splits contested background between neighbours by distance, so a ring
  never reaches into a neighbour's territory or nucleus.
* With cells, a nucleus takes the cell that covers most of it
  (:func:`~mantle_assets.imaging.cells.match_nuclei_to_cells`). When several
  nuclei take the same cell (a binucleate cell, or a cell under-segmented),
  only the nucleus that overlaps it most gets the cell and its cytoplasm; the
  others get no cell, an empty cytoplasm and so a NaN ratio, rather than
  sharing pixels silently.
* The cell's columns follow the nucleus's: ``cell_area``, ``cell_eccentricity``,
  ``cell_solidity`` and ``<channel>_cell_mean`` / ``_integrated`` are
  CellProfiler's ``Cells_AreaShape_Area`` ... and
  ``Cells_Intensity_MeanIntensity_<channel>`` / ``IntegratedIntensity``, as
  ``<channel>_cytoplasm_mean`` is its ``Cytoplasm_Intensity_MeanIntensity``.
* Nuclear pixels are never cytoplasm, whichever nucleus they belong to.
* Channel names become column prefixes, so they must be identifiers
  (``NFkB``, ``DNA``); unnamed channels are called by their file-name label
  (``Channel1``) or ``ch<label>`` when that is not an identifier.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mantle_assets.imaging.cells import cytoplasm_of_cells, match_nuclei_to_cells
from mantle_assets.imaging.fields import FieldGrouping, read_field
from mantle_assets.imaging.io import MAX_FIELD_PIXELS, read_label_image
from mantle_assets.imaging.pipeline import MASK_SUFFIX

__all__ = ["check_channel_names", "cytoplasm_labels", "default_channel_names", "measure_directory", "measure_objects"]

_CHANNEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


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
    return _cells_and_cytoplasm(np.asarray(nuclei), cells, ring_width)[1]


def _cells_and_cytoplasm(
    nuclei: np.ndarray, cells: np.ndarray | None, ring_width: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """The cells relabelled as their nuclei (None without cells) and the cytoplasm labels."""
    from skimage.segmentation import expand_labels

    if cells is None:
        if ring_width < 0:
            raise ValueError(f"ring_width must be at least 0, not {ring_width}")
        grown = expand_labels(nuclei, distance=ring_width)
        return None, np.where(nuclei == 0, grown, 0).astype(nuclei.dtype, copy=False)
    matched = match_nuclei_to_cells(nuclei, cells).cells
    return matched, cytoplasm_of_cells(matched, nuclei)


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
        Whole-cell labels; see :func:`cytoplasm_labels`. With them the
        cytoplasm is the cell minus the nuclei, and the cell is measured too.
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
        With ``cells`` also ``cell_area``, ``cell_eccentricity``,
        ``cell_solidity``, ``C_cell_mean`` and ``C_cell_integrated`` of the
        nucleus's cell (area 0, integral 0 and NaN otherwise where it has none).
        ``attrs["cytoplasm"]`` is ``"cell"`` with ``cells``, else ``"ring"``.

    Raises
    ------
    ValueError
        If ``nuclei`` is not 2-D or a channel's shape differs from it.

    Examples
    --------
    >>> nuclei = np.zeros((5, 5), dtype=int)
    >>> nuclei[2, 2] = 1
    >>> table = measure_objects(nuclei, {"nfkb": np.where(nuclei > 0, 6.0, 2.0)}, ring_width=1)
    >>> int(table.loc[0, "cytoplasm_area"]), float(table.loc[0, "nfkb_ratio"]), table.attrs["cytoplasm"]
    (4, 3.0, 'ring')
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
    matched_cells, cytoplasm = _cells_and_cytoplasm(nuclei, cells, ring_width)
    nucleus_area = shape["area"].to_numpy(dtype=float)

    def areas(objects: np.ndarray) -> np.ndarray:
        return np.bincount(objects.ravel(), minlength=int(nuclei.max(initial=0)) + 1)[labels]

    def mean(total: np.ndarray, area: np.ndarray) -> np.ndarray:
        return np.divide(total, area, out=np.full(labels.shape, np.nan), where=area > 0)

    cytoplasm_area = areas(cytoplasm)
    columns: dict[str, np.ndarray] = {"cytoplasm_area": cytoplasm_area}
    if matched_cells is not None:
        cell_area = areas(matched_cells)
        cell_shape = (
            pd.DataFrame(regionprops_table(matched_cells, properties=("label", "eccentricity", "solidity")))
            .set_index("label")
            .reindex(labels)
        )
        columns |= {
            "cell_area": cell_area,
            "cell_eccentricity": cell_shape["eccentricity"].to_numpy(),
            "cell_solidity": cell_shape["solidity"].to_numpy(),
        }
    for name, image in channels.items():
        image = np.asarray(image, dtype=np.float64)
        nucleus_sum = np.asarray(ndimage.sum_labels(image, nuclei, index=labels), dtype=float)
        cytoplasm_sum = np.asarray(ndimage.sum_labels(image, cytoplasm, index=labels), dtype=float)
        nucleus_mean = nucleus_sum / nucleus_area
        cytoplasm_mean = mean(cytoplasm_sum, cytoplasm_area)
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
        if matched_cells is not None:
            cell_sum = np.asarray(ndimage.sum_labels(image, matched_cells, index=labels), dtype=float)
            columns |= {f"{name}_cell_mean": mean(cell_sum, cell_area), f"{name}_cell_integrated": cell_sum}
    table = pd.concat([shape, pd.DataFrame(columns, index=shape.index)], axis=1)
    table.attrs["cytoplasm"] = "ring" if cells is None else "cell"
    return table


def check_channel_names(names: Sequence[str], n_channels: int) -> list[str]:
    """Check channel names for use as column prefixes, one per channel.

    Parameters
    ----------
    names : sequence of str
        One name per channel, in channel order.
    n_channels : int
        The images' number of channels.

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        One line naming ``channel_names``: wrong count, a name that is not an
        identifier, or a name repeated (ignoring case).

    Examples
    --------
    >>> check_channel_names(["NFkB", "DNA"], 2)
    ['NFkB', 'DNA']
    """
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"channel_names must be a list of names, got {names!r}")
    names = list(names)
    if len(names) != n_channels:
        raise ValueError(f"channel_names: {len(names)} name(s) given but the images have {n_channels} channel(s)")
    for name in names:
        if not _CHANNEL_NAME.fullmatch(name):
            raise ValueError(f"channel_names: {name!r} must start with a letter and hold only letters, digits and _")
    lowered = [name.lower() for name in names]
    if len(set(lowered)) != len(lowered):
        raise ValueError(f"channel_names: names must differ (ignoring case), got {names}")
    return names


def default_channel_names(channel_labels: Sequence[str]) -> list[str]:
    """Names for unnamed channels: the file-name label, or ``ch<label>`` where that is no identifier.

    Examples
    --------
    >>> default_channel_names(["Channel1", "Channel2"]), default_channel_names(["1", "2"])
    (['Channel1', 'Channel2'], ['ch1', 'ch2'])
    """
    return [label if _CHANNEL_NAME.fullmatch(label) else f"ch{label}" for label in channel_labels]


def measure_directory(
    grouping: FieldGrouping,
    mask_directory: str | os.PathLike,
    channel_names: Sequence[str],
    *,
    cell_mask_directory: str | os.PathLike | None = None,
    ring_width: int = 5,
    max_pixels: int = MAX_FIELD_PIXELS,
    max_bytes: int | None = None,
    on_field: Callable[[str, int], None] | None = None,
) -> pd.DataFrame:
    """Measure every field of a segmented image directory (see :func:`measure_objects`).

    Parameters
    ----------
    grouping : FieldGrouping
        The directory's fields.
    mask_directory : path
        Folder with one ``<field>_cp_masks.tif`` label image per field, the
        objects taken as nuclei.
    channel_names : sequence of str
        One name per channel; see :func:`check_channel_names`.
    cell_mask_directory : path, optional
        Folder with one ``<field>_cp_masks.tif`` of whole cells per field; with
        it the cytoplasm is the cell minus the nuclei and cells are measured
        (see :func:`measure_objects`), read with the same checks as the nuclei.
    ring_width : int
        Cytoplasm ring width in pixels when there are no cell masks.
    max_pixels : int
        The most pixels one channel plane of a field or mask may have; the
        masks are read with the same checks as the images
        (:func:`~mantle_assets.imaging.io.read_label_image`).
    max_bytes : int, optional
        The most memory reading one field's file or mask may take; None: no budget.
    on_field : callable, optional
        Called with the field name and its number of objects after each field.

    Returns
    -------
    DataFrame
        ``field``, ``well`` (``"A01"``, or None when the field name holds no
        well) and the columns of :func:`measure_objects`, fields in order;
        ``attrs["cytoplasm"]`` is ``"cell"`` or ``"ring"``.

    Raises
    ------
    ValueError
        One line naming the mask file that is missing, unreadable (an
        :class:`~mantle_assets.imaging.io.ImageReadError`) or of another shape
        than its field, or the channel names at fault.
    """
    names = check_channel_names(channel_names, grouping.n_channels)

    def read_mask(directory: str | os.PathLike, field_name: str, shape: tuple[int, ...]) -> np.ndarray:
        mask_path = Path(directory) / f"{field_name}{MASK_SUFFIX}"
        if not mask_path.is_file():
            raise ValueError(f"{mask_path}: no mask for field {field_name}")
        labels = read_label_image(mask_path, max_pixels=max_pixels, max_bytes=max_bytes)
        if labels.shape != shape:
            raise ValueError(f"{mask_path}: mask shape {labels.shape} differs from field shape {shape}")
        return labels

    tables = []
    for field in grouping.fields:
        stack = read_field(field, max_pixels=max_pixels, max_bytes=max_bytes)
        nuclei = read_mask(mask_directory, field.name, stack.shape[1:])
        cells = None if cell_mask_directory is None else read_mask(cell_mask_directory, field.name, stack.shape[1:])
        table = measure_objects(nuclei, dict(zip(names, stack, strict=True)), cells=cells, ring_width=ring_width)
        table.insert(0, "well", field.well)
        table.insert(0, "field", field.name)
        tables.append(table)
        if on_field is not None:
            on_field(field.name, len(table))
    table = pd.concat(tables, ignore_index=True)
    table.attrs["cytoplasm"] = "ring" if cell_mask_directory is None else "cell"
    return table
