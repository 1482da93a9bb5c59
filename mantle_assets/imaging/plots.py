"""PNG figures of a plate: the dose-response curve and a 96-well heat map.

Figures are drawn on an explicit Agg canvas rather than through
:mod:`matplotlib.pyplot`, so no global backend or figure registry is touched:
they work headless and from several threads (e.g. concurrent asset runs).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from mantle_assets.imaging.assay import DoseResponseFit, normalise_well

__all__ = ["dose_response_png", "plate_heatmap_png"]

PLATE_ROWS = "ABCDEFGH"
PLATE_COLUMNS = 12
DPI = 100


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def dose_response_png(doses_summary: pd.DataFrame, fit: DoseResponseFit | None, *, title: str) -> bytes:
    """Mean response per dose with SD error bars, and the fitted logistic.

    Parameters
    ----------
    doses_summary : DataFrame
        ``dose``, ``mean`` and ``sd`` per dose, as from
        :func:`~mantle_assets.imaging.assay.dose_summary`.
    fit : DoseResponseFit or None
        The fitted curve; None draws the points only (e.g. when the fit failed).
    title : str
        Figure title.

    Returns
    -------
    bytes
        A PNG image.
    """
    doses = doses_summary["dose"].to_numpy(dtype=float)
    positive = doses[doses > 0]
    figure = _new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    axes.errorbar(
        doses,
        doses_summary["mean"].to_numpy(dtype=float),
        yerr=doses_summary["sd"].to_numpy(dtype=float),
        fmt="o",
        capsize=3,
        label="mean ± SD of wells",
    )
    if positive.size:
        smallest = float(positive.min())
        if (doses == 0).any():
            # A log axis cannot show the untreated point; symlog keeps it, linear up to the smallest dose.
            axes.set_xscale("symlog", linthresh=smallest)
            curve_x = np.concatenate([np.linspace(0.0, smallest, 50), np.geomspace(smallest, positive.max(), 200)])
        else:
            axes.set_xscale("log")
            curve_x = np.geomspace(smallest, positive.max(), 200)
        if fit is not None:
            low, high = fit.ec50_ci95
            axes.plot(
                curve_x,
                fit.predict(curve_x),
                label=f"4PL fit: EC50 {fit.ec50:.3g} (95% CI {low:.3g}-{high:.3g}), R² {fit.r_squared:.3f}",
            )
            axes.axvline(fit.ec50, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("dose")
    axes.set_ylabel("response")
    axes.set_title(title)
    axes.legend(fontsize="small")
    return _png(figure)


def plate_heatmap_png(wells: pd.DataFrame, *, value_column: str, title: str) -> bytes:
    """A 96-well plate (rows A-H, columns 1-12) coloured by a per-well value.

    Parameters
    ----------
    wells : DataFrame
        ``well`` (``"A01"`` or ``"A1"``) and ``value_column``; wells not listed,
        or with NaN, are drawn blank.
    value_column : str
        Column to colour by.
    title : str
        Figure title.

    Returns
    -------
    bytes
        A PNG image.

    Raises
    ------
    ValueError
        If a well name is not on a 96-well plate.
    """
    grid = np.full((len(PLATE_ROWS), PLATE_COLUMNS), np.nan)
    for well, value in zip(wells["well"], wells[value_column].to_numpy(dtype=float), strict=True):
        try:
            name = normalise_well(well)
        except ValueError:
            name = ""
        row, column = name[:-2], int(name[-2:] or 0)
        if len(row) != 1 or row not in PLATE_ROWS or not 1 <= column <= PLATE_COLUMNS:
            raise ValueError(f"well {well!r} is not on a 96-well plate (A01-H12)")
        grid[PLATE_ROWS.index(row), column - 1] = value

    figure = _new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid), cmap="viridis")
    axes.set_xticks(range(PLATE_COLUMNS), [str(c) for c in range(1, PLATE_COLUMNS + 1)])
    axes.set_yticks(range(len(PLATE_ROWS)), list(PLATE_ROWS))
    axes.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False)
    figure.colorbar(image, ax=axes, label=value_column)
    axes.set_title(title)
    return _png(figure)
