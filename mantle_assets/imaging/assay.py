"""Plate-level summaries of an assay: well QC, dose response, Z'.

Per-object measurements (see :mod:`mantle_assets.imaging.measurements`) are
reduced to one median per well, wells to one mean per dose, and the doses are
fitted with a four-parameter logistic. Controls give the Z' factor.

Decisions worth knowing
-----------------------
* The logistic keeps ``hill > 0`` and lets ``top`` fall below ``bottom`` for a
  falling response; allowing both signs of ``hill`` would give every curve two
  equivalent parameter sets.
* EC50 is fitted as its logarithm: it stays positive without a hard bound, and
  its 95% interval (t distribution, ``n_points - 4`` degrees of freedom) is
  symmetric on the log scale, as dose spacing usually is.
* A well with no objects has no rows in the object table; pass
  ``expected_wells`` to :func:`well_summary` so that it is reported (and
  flagged) rather than missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike

import numpy as np
import pandas as pd

__all__ = [
    "DoseResponseFit",
    "dose_summary",
    "fit_dose_response",
    "four_parameter_logistic",
    "read_plate_layout",
    "well_summary",
    "z_prime",
]

MIN_DISTINCT_DOSES = 5
# How far outside the tested positive doses the EC50 may wander, as a factor:
# beyond that the data say nothing about it and the optimiser only drifts.
EC50_RANGE_FACTOR = 1e3
MAX_HILL = 20.0
LAYOUT_COLUMNS = ("ImageNumber", "Column", "Row", "SBS_Doses", "SBS_Controls")


def z_prime(positive: np.ndarray, negative: np.ndarray) -> float:
    """Z' factor of an assay from its positive and negative control values.

    ``1 - 3 (sd_p + sd_n) / |mean_p - mean_n|`` with sample standard
    deviations (``ddof=1``). Above 0.5 is an excellent assay.

    Parameters
    ----------
    positive, negative : array_like
        Control readings (e.g. per-well medians), at least two of each.

    Returns
    -------
    float
        Z'; ``-inf`` when the control means are equal.

    Examples
    --------
    >>> round(z_prime([9.0, 10.0, 11.0], [0.0, 1.0, 2.0]), 6)
    0.333333
    """
    positive = np.asarray(positive, dtype=float)
    negative = np.asarray(negative, dtype=float)
    if positive.size < 2 or negative.size < 2:
        raise ValueError(f"z_prime needs at least two values per control, got {positive.size} and {negative.size}")
    spread = 3.0 * (positive.std(ddof=1) + negative.std(ddof=1))
    separation = abs(positive.mean() - negative.mean())
    if separation == 0:
        return float("-inf")
    return float(1.0 - spread / separation)


def four_parameter_logistic(x, bottom: float, top: float, ec50: float, hill: float) -> np.ndarray:
    """The four-parameter logistic ``bottom + (top - bottom) / (1 + (ec50 / x) ** hill)``.

    Parameters
    ----------
    x : array_like
        Doses, ``x >= 0``; ``x = 0`` gives the ``bottom`` asymptote (for ``hill > 0``).
    bottom, top : float
        Responses at zero and infinite dose (for ``hill > 0``).
    ec50 : float
        Dose of the half-way response, ``> 0``.
    hill : float
        Hill slope.

    Returns
    -------
    ndarray of float, shaped as ``x``

    Examples
    --------
    >>> [round(float(v), 3) for v in four_parameter_logistic([0.0, 1.0, 10.0], 0.0, 100.0, 1.0, 1.0)]
    [0.0, 50.0, 90.909]
    """
    x = np.asarray(x, dtype=float)
    # ec50 / 0 = inf and inf ** hill give the right limit at x = 0 for either sign of hill.
    with np.errstate(divide="ignore", over="ignore"):
        return bottom + (top - bottom) / (1.0 + (ec50 / x) ** hill)


@dataclass(frozen=True)
class DoseResponseFit:
    """A fitted four-parameter logistic; see :func:`four_parameter_logistic`.

    Attributes
    ----------
    bottom, top, ec50, hill : float
        Fitted parameters.
    ec50_ci95 : tuple of float
        95% confidence interval of ``ec50`` (low, high).
    r_squared : float
        Coefficient of determination of the fit on the points given.
    n_points : int
        Number of (dose, response) points fitted.
    """

    bottom: float
    top: float
    ec50: float
    hill: float
    ec50_ci95: tuple[float, float]
    r_squared: float
    n_points: int

    def predict(self, doses) -> np.ndarray:
        """Fitted responses at ``doses``."""
        return four_parameter_logistic(doses, self.bottom, self.top, self.ec50, self.hill)


def _log_ec50_model(x, bottom, top, log_ec50, hill):
    return four_parameter_logistic(x, bottom, top, np.exp(log_ec50), hill)


def fit_dose_response(doses, responses) -> DoseResponseFit:
    """Fit a four-parameter logistic to dose-response points.

    Parameters
    ----------
    doses : array_like
        Doses, ``>= 0`` (zero is allowed, as the untreated point), at least
        five distinct values; replicates may repeat a dose.
    responses : array_like
        One response per dose.

    Returns
    -------
    DoseResponseFit

    Raises
    ------
    ValueError
        Fewer than five distinct doses, mismatched or non-finite input,
        negative doses, or a fit that does not converge.

    Examples
    --------
    >>> doses = np.array([0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
    >>> fit = fit_dose_response(doses, four_parameter_logistic(doses, 1.0, 5.0, 2.0, 1.5))
    >>> round(fit.ec50, 4), round(fit.hill, 4), fit.n_points
    (2.0, 1.5, 7)
    """
    from scipy import optimize, stats

    doses = np.asarray(doses, dtype=float).ravel()
    responses = np.asarray(responses, dtype=float).ravel()
    if doses.shape != responses.shape:
        raise ValueError(f"got {doses.size} doses but {responses.size} responses")
    if not (np.isfinite(doses).all() and np.isfinite(responses).all()):
        raise ValueError("doses and responses must be finite")
    if (doses < 0).any():
        raise ValueError("doses must be at least 0")
    distinct = np.unique(doses)
    if distinct.size < MIN_DISTINCT_DOSES:
        raise ValueError(f"a dose-response fit needs at least {MIN_DISTINCT_DOSES} distinct doses, got {distinct.size}")

    low_response = responses[doses == distinct[0]].mean()
    high_response = responses[doses == distinct[-1]].mean()
    positive = distinct[distinct > 0]
    means = np.array([responses[doses == d].mean() for d in positive])
    half_way = positive[np.argmin(np.abs(means - (low_response + high_response) / 2))]
    log_low = np.log(positive[0] / EC50_RANGE_FACTOR)
    log_high = np.log(positive[-1] * EC50_RANGE_FACTOR)
    try:
        params, covariance = optimize.curve_fit(
            _log_ec50_model,
            doses,
            responses,
            p0=(low_response, high_response, np.log(half_way), 1.0),
            bounds=((-np.inf, -np.inf, log_low, 1e-3), (np.inf, np.inf, log_high, MAX_HILL)),
            x_scale="jac",
            max_nfev=10_000,
        )
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"dose-response fit did not converge: {error}") from None
    if not np.isfinite(params).all():
        raise ValueError("dose-response fit did not converge: non-finite parameters")

    bottom, top, log_ec50, hill = (float(p) for p in params)
    half_width = stats.t.ppf(0.975, doses.size - 4) * np.sqrt(covariance[2, 2])
    residual = responses - _log_ec50_model(doses, *params)
    total = ((responses - responses.mean()) ** 2).sum()
    r_squared = 1.0 - (residual**2).sum() / total if total > 0 else float("nan")
    return DoseResponseFit(
        bottom=bottom,
        top=top,
        ec50=float(np.exp(log_ec50)),
        hill=hill,
        ec50_ci95=(float(np.exp(log_ec50 - half_width)), float(np.exp(log_ec50 + half_width))),
        r_squared=float(r_squared),
        n_points=int(doses.size),
    )


def well_summary(
    objects: pd.DataFrame,
    *,
    value_column: str,
    well_column: str = "well",
    min_cells: int = 50,
    expected_wells: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Per-well object count, median read-out and count QC flags.

    Parameters
    ----------
    objects : DataFrame
        One row per object, with ``well_column`` and ``value_column``.
    value_column : str
        The read-out to summarise (e.g. ``"nfkb_ratio"``); NaNs are left out
        of the median but the objects still count.
    well_column : str
        Column naming each object's well.
    min_cells : int
        Wells with fewer objects are flagged ``too_few_cells``.
    expected_wells : iterable of str, optional
        Every well of the plate; those without objects get ``n_cells`` 0.

    Returns
    -------
    DataFrame
        One row per well, sorted: ``well``, ``n_cells``, ``median``,
        ``too_few_cells`` and ``low_count_vs_plate`` (fewer than half the
        plate's median count).

    Examples
    --------
    >>> objects = pd.DataFrame({"well": ["A01"] * 3 + ["A02"], "ratio": [1.0, 2.0, 9.0, 4.0]})
    >>> well_summary(objects, value_column="ratio", min_cells=2)[["well", "n_cells", "median", "too_few_cells"]]
      well  n_cells  median  too_few_cells
    0  A01        3     2.0          False
    1  A02        1     4.0           True
    """
    for column in (well_column, value_column):
        if column not in objects.columns:
            raise ValueError(f"objects have no column {column!r}")
    grouped = objects.groupby(well_column, sort=True)[value_column]
    wells = pd.DataFrame({"n_cells": grouped.size(), "median": grouped.median()})
    if expected_wells is not None:
        wells = wells.reindex(sorted(set(wells.index) | set(expected_wells)))
        wells["n_cells"] = wells["n_cells"].fillna(0)
    wells["n_cells"] = wells["n_cells"].astype(int)
    wells["too_few_cells"] = wells["n_cells"] < min_cells
    wells["low_count_vs_plate"] = wells["n_cells"] < 0.5 * wells["n_cells"].median()
    return wells.rename_axis("well").reset_index()


def dose_summary(wells: pd.DataFrame, layout: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread of the well medians at each dose point.

    Parameters
    ----------
    wells : DataFrame
        Output of :func:`well_summary` (``well``, ``median``); drop QC-failed
        wells first if they should not count.
    layout : DataFrame
        ``well``, ``dose``, ``control`` (-1 negative, 0 dose point, 1 positive),
        e.g. from :func:`read_plate_layout`.

    Returns
    -------
    DataFrame
        One row per dose of the dose-point wells, sorted by dose: ``dose``,
        ``mean``, ``sd`` (sample, NaN for one well) and ``n_wells`` (wells with
        a median).

    Examples
    --------
    >>> wells = pd.DataFrame({"well": ["A01", "A02", "A03", "A04"], "median": [1.0, 3.0, 5.0, 9.0]})
    >>> layout = pd.DataFrame({"well": ["A01", "A02", "A03", "A04"], "dose": [1.0, 1.0, 2.0, 0.0],
    ...                        "control": [0, 0, 0, 1]})
    >>> dose_summary(wells, layout)
       dose  mean        sd  n_wells
    0   1.0   2.0  1.414214        2
    1   2.0   5.0       NaN        1
    """
    dose_points = layout.loc[layout["control"] == 0, ["well", "dose"]]
    joined = dose_points.merge(wells[["well", "median"]], on="well", how="inner")
    summary = joined.groupby("dose", sort=True)["median"].agg(mean="mean", sd="std", n_wells="count")
    return summary.reset_index()


def read_plate_layout(csv_path: str | PathLike[str]) -> pd.DataFrame:
    """Read a BBBC014-style plate layout (``ImageNumber,Column,Row,SBS_Doses,SBS_Controls``).

    Parameters
    ----------
    csv_path : path
        The CSV file.

    Returns
    -------
    DataFrame
        ``well`` (``"A01"``), ``image_number`` (int), ``dose`` (float) and
        ``control`` (int: -1 negative, 0 dose point, 1 positive).
    """
    raw = pd.read_csv(csv_path, dtype=str, skipinitialspace=True)
    missing = [column for column in LAYOUT_COLUMNS if column not in raw.columns]
    if missing:
        raise ValueError(f"{csv_path} is not a plate layout: no column(s) {', '.join(missing)}")
    rows = raw["Row"].str.strip().str.upper()
    columns = raw["Column"].astype(int)
    return pd.DataFrame(
        {
            "well": [f"{row}{column:02d}" for row, column in zip(rows, columns, strict=True)],
            "image_number": raw["ImageNumber"].astype(int),
            "dose": raw["SBS_Doses"].astype(float),
            "control": raw["SBS_Controls"].astype(int),
        }
    )
