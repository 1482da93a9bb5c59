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

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from os import PathLike

import numpy as np
import pandas as pd

__all__ = [
    "DoseResponseFit",
    "PlateReadout",
    "dose_summary",
    "fit_dose_response",
    "four_parameter_logistic",
    "json_records",
    "normalise_well",
    "plate_readout",
    "read_plate_layout",
    "significant",
    "well_summary",
    "z_prime",
]

MIN_DISTINCT_DOSES = 5
# How far outside the tested positive doses the EC50 may wander, as a factor:
# beyond that the data say nothing about it and the optimiser only drifts.
EC50_RANGE_FACTOR = 1e3
MAX_HILL = 20.0
BBBC014_LAYOUT_COLUMNS = ("ImageNumber", "Column", "Row", "SBS_Doses", "SBS_Controls")
MAX_PLATE_COLUMNS = 48  # a 1536-well plate
_WELL_NAME = re.compile(r"([A-Z]{1,2})0*(\d{1,2})")


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


def normalise_well(name: str) -> str:
    """A well name as row letter(s) and two-digit column: ``"a1"`` and ``"A01"`` give ``"A01"``.

    Parameters
    ----------
    name : str
        A well name, e.g. ``"B7"``, ``"b07"`` or ``"AA12"`` (1536-well rows).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If ``name`` is not a row of one or two letters followed by a column of 1 to 48.

    Examples
    --------
    >>> normalise_well(" b7 "), normalise_well("H12")
    ('B07', 'H12')
    """
    match = _WELL_NAME.fullmatch(str(name).strip().upper())
    if not match or not 1 <= int(match[2]) <= MAX_PLATE_COLUMNS:
        raise ValueError(f"{name!r} is not a well name like A01")
    return f"{match[1]}{int(match[2]):02d}"


def read_plate_layout(csv_path: str | PathLike[str]) -> pd.DataFrame:
    """Read a plate layout: which treatment, dose and control role each well has.

    Two layouts are understood, told apart by their header:

    * ``well,dose,control`` with an optional ``treatment`` column (names are
      case-insensitive; ``well`` like ``A01`` or ``a1``);
    * BBBC014's / CellProfiler's ``ImageNumber,Column,Row,SBS_Doses,SBS_Controls``.

    ``control`` is -1 for a negative control, 0 for a dose point and 1 for a
    positive control.

    Parameters
    ----------
    csv_path : path
        The CSV file.

    Returns
    -------
    DataFrame
        ``well`` (``"A01"``), ``treatment`` (str, empty when not given),
        ``dose`` (float) and ``control`` (int), in file order.

    Raises
    ------
    ValueError
        One line naming the file: unreadable, neither layout, a bad well name,
        a dose that is not a number >= 0, a control not in -1/0/1, a well
        listed twice, or no rows.
    """
    try:
        raw = pd.read_csv(csv_path, dtype=str, skipinitialspace=True, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{csv_path}: not a readable CSV file: {str(error).splitlines()[0]}") from None
    raw.columns = [str(column).strip() for column in raw.columns]
    lower = {column.lower(): column for column in raw.columns}
    if {"well", "dose", "control"} <= set(lower):
        wells = raw[lower["well"]]
        treatment = raw[lower["treatment"]] if "treatment" in lower else pd.Series("", index=raw.index)
        doses, controls = raw[lower["dose"]], raw[lower["control"]]
    elif set(BBBC014_LAYOUT_COLUMNS) <= set(raw.columns):
        wells = raw["Row"].str.strip() + raw["Column"].str.strip()
        treatment = pd.Series("", index=raw.index)
        doses, controls = raw["SBS_Doses"], raw["SBS_Controls"]
    else:
        raise ValueError(
            f"{csv_path} is not a plate layout: expected columns well,dose,control[,treatment] "
            f"or {','.join(BBBC014_LAYOUT_COLUMNS)}"
        )
    if raw.empty:
        raise ValueError(f"{csv_path}: the plate layout lists no wells")

    def parsed(values: pd.Series, convert, what: str) -> list:
        out = []
        for line, value in enumerate(values, start=2):
            try:
                out.append(convert(str(value).strip()))
            except ValueError:
                raise ValueError(f"{csv_path}, line {line}: {value!r} is not {what}") from None
        return out

    layout = pd.DataFrame(
        {
            "well": parsed(wells, normalise_well, "a well name like A01"),
            "treatment": [str(t).strip() for t in treatment],
            "dose": parsed(doses, _dose, "a dose (a number >= 0)"),
            "control": parsed(controls, _control, "a control flag (-1, 0 or 1)"),
        }
    )
    repeated = layout.loc[layout["well"].duplicated(), "well"]
    if not repeated.empty:
        raise ValueError(f"{csv_path}: well {repeated.iloc[0]} is listed more than once")
    return layout


def _dose(text: str) -> float:
    dose = float(text)
    if not (np.isfinite(dose) and dose >= 0):
        raise ValueError(text)
    return dose


def _control(text: str) -> int:
    if text not in ("-1", "0", "1"):
        raise ValueError(text)
    return int(text)


@dataclass(frozen=True)
class PlateReadout:
    """The readout of one plate; see :func:`plate_readout`.

    Attributes
    ----------
    value_column : str
        The per-object column summarised.
    wells : DataFrame
        :func:`well_summary` joined with the layout (``treatment``, ``dose``,
        ``control``; missing for wells the layout does not list) and ``used``
        (whether the well passed QC and counts towards Z' and the fit).
    doses : DataFrame
        :func:`dose_summary` of the used dose-point wells (empty without a layout).
    z_prime : float or None
        Z' of the used control wells' medians; None when it cannot be computed.
    fit : DoseResponseFit or None
        4PL fit of the used dose-point wells' medians; None when it cannot be computed.
    notes : dict of str to str
        Why ``z_prime`` or ``fit`` is None, by their names.
    """

    value_column: str
    wells: pd.DataFrame
    doses: pd.DataFrame
    z_prime: float | None
    fit: DoseResponseFit | None
    notes: dict[str, str]

    @property
    def n_cells(self) -> int:
        """Number of objects on the plate."""
        return int(self.wells["n_cells"].sum())

    def to_json(self, *, digits: int | None = None) -> dict:
        """The readout as JSON-ready values (NaN as None): ``z_prime``, ``ec50``, ``n_cells``, ``wells``, ...

        Parameters
        ----------
        digits : int, optional
            Round for people to read: Z', R² and values of the readout's scale
            (medians, means, ``bottom``, ``top``) to ``digits`` decimals; EC50,
            its interval, the Hill slope, doses and SDs, whose scale varies, to
            ``digits`` significant digits. ``None`` keeps full precision.

        Examples
        --------
        >>> wells = pd.DataFrame({"well": ["A01"], "n_cells": [60], "median": [0.7400115424414998]})
        >>> readout = PlateReadout("ratio", wells, pd.DataFrame(), 0.7400115424414998, None, {})
        >>> rounded = readout.to_json(digits=3)
        >>> rounded["z_prime"], rounded["wells"][0]["median"], readout.to_json()["z_prime"]
        (0.74, 0.74, 0.7400115424414998)
        """
        fit = self.fit
        decimals, figures = _rounders(digits)
        return {
            "readout": self.value_column,
            "z_prime": decimals(self.z_prime),
            "ec50": None if fit is None else figures(fit.ec50),
            "ec50_ci95": None if fit is None else [figures(bound) for bound in fit.ec50_ci95],
            "fit": None if fit is None else {
                "bottom": decimals(fit.bottom), "top": decimals(fit.top), "ec50": figures(fit.ec50),
                "hill": figures(fit.hill), "ec50_ci95": [figures(bound) for bound in fit.ec50_ci95],
                "r_squared": decimals(_finite_or_none(fit.r_squared)), "n_points": fit.n_points,
            },
            "n_cells": self.n_cells,
            "wells": _rounded(json_records(self.wells), {"median": decimals, "dose": figures}),
            "doses": _rounded(json_records(self.doses), {"dose": figures, "mean": decimals, "sd": figures}),
            "notes": dict(self.notes),
        }


def significant(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded to ``digits`` significant digits; None, 0 and non-finite values unchanged.

    Examples
    --------
    >>> significant(0.0012345), significant(123456.0), significant(-2.71828, 2), significant(None)
    (0.00123, 123000.0, -2.7, None)
    """
    if value is None or value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _rounders(digits: int | None) -> tuple[Callable, Callable]:
    """Rounding to ``digits`` decimals and to ``digits`` significant digits, or two identities."""
    if digits is None:
        return (lambda value: value), (lambda value: value)
    return (lambda value: None if value is None else round(value, digits)), (lambda value: significant(value, digits))


def _rounded(records: list[dict], rounders: dict[str, Callable]) -> list[dict]:
    return [{key: rounders[key](value) if key in rounders else value for key, value in record.items()}
            for record in records]


def _finite_or_none(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def json_records(frame: pd.DataFrame) -> list[dict]:
    """A table's rows as dicts of plain Python values, NaN as None (JSON-ready).

    Examples
    --------
    >>> json_records(pd.DataFrame({"well": ["A01"], "median": [float("nan")], "n": [3]}))
    [{'well': 'A01', 'median': None, 'n': 3}]
    """
    records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    return [{key: value.item() if isinstance(value, np.generic) else value for key, value in record.items()}
            for record in records]


def plate_readout(
    objects: pd.DataFrame,
    *,
    value_column: str,
    layout: pd.DataFrame | None = None,
    expected_wells: Iterable[str] | None = None,
    min_cells: int = 50,
) -> PlateReadout:
    """Summarise a plate: per-well medians and QC, per-dose means, Z' and a 4PL fit.

    Wells flagged ``too_few_cells`` or without a median are left out of Z'
    and the fit (``used`` False). Parts that cannot be computed (no layout,
    fewer than two used wells of a control, fewer than five doses, a fit that
    does not converge) are None, with the reason in ``notes``.

    Parameters
    ----------
    objects : DataFrame
        One row per object with ``well`` and ``value_column``; rows without a
        well are ignored.
    value_column : str
        The read-out, e.g. ``"NFkB_ratio"``.
    layout : DataFrame, optional
        From :func:`read_plate_layout`.
    expected_wells : iterable of str, optional
        Every imaged well, so that wells without objects are reported.
    min_cells : int
        Wells with fewer objects are flagged and not used.

    Returns
    -------
    PlateReadout

    Raises
    ------
    ValueError
        If no object has a well or ``value_column`` is missing.

    Examples
    --------
    >>> objects = pd.DataFrame({"well": ["A01"] * 2 + ["A02"] * 2 + ["A03"] * 2 + ["A04"] * 2,
    ...                         "ratio": [1.0, 1.2, 0.9, 1.1, 4.0, 4.2, 3.9, 4.1]})
    >>> layout = pd.DataFrame({"well": ["A01", "A02", "A03", "A04"], "treatment": "",
    ...                        "dose": [0.0, 0.0, 10.0, 10.0], "control": [-1, -1, 1, 1]})
    >>> readout = plate_readout(objects, value_column="ratio", layout=layout, min_cells=2)
    >>> round(readout.z_prime, 3), readout.fit is None, readout.notes["fit"]
    (0.859, True, 'no dose-point wells')
    """
    if "well" not in objects.columns:
        raise ValueError("objects have no column 'well'")
    placed = objects[objects["well"].notna()]
    expected_wells = None if expected_wells is None else list(expected_wells)
    if placed.empty and not expected_wells:
        raise ValueError("no object has a well: a plate readout needs field names holding wells like A01")
    wells = well_summary(placed, value_column=value_column, min_cells=min_cells, expected_wells=expected_wells)
    wells["used"] = ~wells["too_few_cells"] & wells["median"].notna()
    notes: dict[str, str] = {}
    if layout is None:
        wells = wells.assign(treatment=None, dose=np.nan, control=np.nan)
        notes["z_prime"] = notes["fit"] = "no plate layout"
        return PlateReadout(value_column, wells, pd.DataFrame(columns=["dose", "mean", "sd", "n_wells"]),
                            None, None, notes)

    wells = wells.merge(layout[["well", "treatment", "dose", "control"]], on="well", how="left")
    used = wells[wells["used"]]
    doses = dose_summary(used, layout)

    controls = {role: used.loc[used["control"] == flag, "median"] for role, flag in (("positive", 1), ("negative", -1))}
    short = [f"{values.size} {role}" for role, values in controls.items() if values.size < 2]
    z = None
    if short:
        notes["z_prime"] = f"needs two used wells of each control, got {' and '.join(short)}"
    else:
        z = z_prime(controls["positive"], controls["negative"])

    points = used[used["control"] == 0]
    fit = None
    if points.empty:
        notes["fit"] = "no dose-point wells"
    else:
        try:
            fit = fit_dose_response(points["dose"], points["median"])
        except ValueError as error:
            notes["fit"] = str(error)
    return PlateReadout(value_column, wells, doses, z, fit, notes)
