import io
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mantle_assets.imaging.assay import fit_dose_response, four_parameter_logistic
from mantle_assets.imaging.plots import dose_response_png, plate_heatmap_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decoded(data: bytes) -> Image.Image:
    assert data.startswith(PNG_SIGNATURE)
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture


def dose_table(doses: np.ndarray) -> pd.DataFrame:
    means = four_parameter_logistic(doses, 1.0, 3.0, 0.5, 1.2)
    return pd.DataFrame({"dose": doses, "mean": means, "sd": np.full(doses.size, 0.1), "n_wells": 8})


@pytest.mark.parametrize("doses", [np.array([0.0, 0.03, 0.1, 0.3, 1, 3, 10]), np.array([0.03, 0.1, 0.3, 1, 3, 10])])
def test_dose_response_png_with_and_without_a_zero_dose(doses):
    table = dose_table(doses)
    fit = fit_dose_response(table["dose"], table["mean"])
    picture = decoded(dose_response_png(table, fit, title="NF-kB translocation"))
    assert len(picture.getbands()) == 4  # RGBA
    assert picture.width > 100 and picture.height > 100


def test_dose_response_png_without_a_fit_and_with_a_missing_sd():
    table = dose_table(np.array([0.0, 1.0, 10.0]))
    table.loc[1, "sd"] = np.nan
    assert len(decoded(dose_response_png(table, None, title="points only")).getbands()) == 4


def test_plate_heatmap_png():
    rows, columns = np.meshgrid(list("ABCDEFGH"), range(1, 13), indexing="ij")
    wells = pd.DataFrame({"well": [f"{r}{c:02d}" for r, c in zip(rows.ravel(), columns.ravel(), strict=True)]})
    wells["median"] = np.arange(96, dtype=float)
    wells.loc[5, "median"] = np.nan
    picture = decoded(plate_heatmap_png(wells.iloc[:90], value_column="median", title="plate"))
    assert len(picture.getbands()) == 4


def test_plate_heatmap_refuses_wells_off_a_96_well_plate():
    with pytest.raises(ValueError, match="'I01'"):
        plate_heatmap_png(pd.DataFrame({"well": ["A01", "I01"], "v": [1.0, 2.0]}), value_column="v", title="t")
    with pytest.raises(ValueError, match="'A13'"):
        plate_heatmap_png(pd.DataFrame({"well": ["A13"], "v": [1.0]}), value_column="v", title="t")


def test_plots_leave_pyplot_alone():
    plate_heatmap_png(pd.DataFrame({"well": ["A01"], "v": [1.0]}), value_column="v", title="t")
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
