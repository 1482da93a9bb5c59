from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mantle_assets.demo import default_data_candidates
from mantle_assets.imaging.assay import (
    dose_summary,
    fit_dose_response,
    four_parameter_logistic,
    read_plate_layout,
    well_summary,
    z_prime,
)
from mantle_assets_tests.conftest import missing_data

DOSES = np.array([0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
TRUE = {"bottom": 1.2, "top": 3.5, "ec50": 0.8, "hill": 1.3}


def test_z_prime_matches_the_formula_on_fixed_samples():
    positive = np.array([10.0, 12.0, 11.0, 13.0])  # mean 11.5, sd sqrt(5/3)
    negative = np.array([2.0, 1.0, 3.0])  # mean 2, sd 1
    expected = 1 - 3 * (np.sqrt(5 / 3) + 1.0) / 9.5
    assert z_prime(positive, negative) == pytest.approx(expected, rel=1e-12)
    assert z_prime(negative, positive) == pytest.approx(expected, rel=1e-12)


def test_z_prime_of_well_separated_samples_approaches_the_population_value():
    rng = np.random.default_rng(0)
    positive = rng.normal(100.0, 2.0, 20_000)
    negative = rng.normal(20.0, 4.0, 20_000)
    assert z_prime(positive, negative) == pytest.approx(1 - 3 * 6.0 / 80.0, abs=0.01)


def test_z_prime_edge_cases():
    assert z_prime([1.0, 2.0], [1.0, 2.0]) == float("-inf")
    with pytest.raises(ValueError, match="at least two"):
        z_prime([1.0], [1.0, 2.0])


def test_logistic_limits():
    y = four_parameter_logistic([0.0, 0.8, 1e12], **TRUE)
    np.testing.assert_allclose(y, [1.2, (1.2 + 3.5) / 2, 3.5])
    # A negative hill slope swaps the asymptotes, including at x = 0.
    np.testing.assert_allclose(four_parameter_logistic([0.0, 1e12], 1.0, 2.0, 1.0, -1.0), [2.0, 1.0])


def test_fit_recovers_noiseless_parameters():
    fit = fit_dose_response(DOSES, four_parameter_logistic(DOSES, **TRUE))
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-3), name
    assert fit.r_squared == pytest.approx(1.0)
    assert fit.n_points == DOSES.size
    with pytest.raises(FrozenInstanceError):
        fit.ec50 = 1.0  # type: ignore[misc]


def test_fit_recovers_a_falling_curve_and_tiny_doses():
    doses = DOSES * 1e-9  # molar
    truth = {"bottom": 50.0, "top": 5.0, "ec50": 2e-9, "hill": 0.9}
    fit = fit_dose_response(doses, four_parameter_logistic(doses, **truth))
    for name, value in truth.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-3), name


def test_noisy_fit_has_the_true_ec50_within_its_interval():
    rng = np.random.default_rng(1)
    doses = np.repeat(DOSES, 3)
    responses = four_parameter_logistic(doses, **TRUE) + rng.normal(0.0, 0.05, doses.size)
    fit = fit_dose_response(doses, responses)
    low, high = fit.ec50_ci95
    assert low < fit.ec50 < high
    assert low < TRUE["ec50"] < high
    assert high / low < 2  # the interval is informative, not merely huge
    assert fit.r_squared > 0.98
    assert fit.n_points == 30


def test_too_few_doses_are_refused():
    doses = np.repeat([0.0, 0.1, 1.0, 10.0], 3)
    with pytest.raises(ValueError, match="at least 5 distinct doses") as error:
        fit_dose_response(doses, four_parameter_logistic(doses, **TRUE))
    assert "\n" not in str(error.value)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="responses"):
        fit_dose_response(DOSES, DOSES[:-1])
    with pytest.raises(ValueError, match="at least 0"):
        fit_dose_response(-DOSES, DOSES)


OBJECTS = pd.DataFrame(
    {
        "well": ["A01"] * 4 + ["A02"] * 4 + ["A03"] * 1 + ["B01"] * 5,
        "ratio": [1.0, 2.0, 3.0, 10.0] + [5.0, 6.0, np.nan, 7.0] + [4.0] + [0.5] * 5,
    }
)


def test_well_summary_counts_medians_and_flags():
    wells = well_summary(OBJECTS, value_column="ratio", min_cells=4)
    assert wells["well"].tolist() == ["A01", "A02", "A03", "B01"]
    assert wells["n_cells"].tolist() == [4, 4, 1, 5]  # a NaN read-out still counts as a cell
    assert wells["median"].tolist() == [2.5, 6.0, 4.0, 0.5]
    assert wells["too_few_cells"].tolist() == [False, False, True, False]
    # Plate median count is 4: only the well with 1 < 2 is low.
    assert wells["low_count_vs_plate"].tolist() == [False, False, True, False]


def test_well_summary_reports_expected_wells_without_objects():
    objects = OBJECTS.rename(columns={"well": "position"})
    wells = well_summary(objects, well_column="position", value_column="ratio", min_cells=1, expected_wells=["A04"])
    empty = wells.set_index("well").loc["A04"]
    assert empty["n_cells"] == 0 and np.isnan(empty["median"]) and empty["too_few_cells"]
    with pytest.raises(ValueError, match="'nope'"):
        well_summary(OBJECTS, value_column="nope")


def test_dose_summary_keeps_dose_points_only():
    wells = pd.DataFrame(
        {"well": ["A01", "A02", "A03", "A04", "A05", "A06"], "median": [1.0, 3.0, 10.0, np.nan, 0.0, 50.0]}
    )
    layout = pd.DataFrame(
        {
            "well": ["A01", "A02", "A03", "A04", "A05", "A06", "A07"],
            "dose": [1.0, 1.0, 2.0, 2.0, 0.0, 9.0, 3.0],
            "control": [0, 0, 0, 0, -1, 1, 0],
        }
    )
    summary = dose_summary(wells, layout)
    assert summary.columns.tolist() == ["dose", "mean", "sd", "n_wells"]
    assert summary["dose"].tolist() == [1.0, 2.0]  # controls left out; A07 has no data
    assert summary["mean"].tolist() == [2.0, 10.0]
    assert summary["sd"].iloc[0] == pytest.approx(np.sqrt(2.0))
    assert np.isnan(summary["sd"].iloc[1])
    assert summary["n_wells"].tolist() == [2, 1]


LAYOUT_CSV = "ImageNumber,Column,Row,SBS_Doses,SBS_Controls\n1,01,A,0,-1\n2,02,A,1,0\n3,12,A,10,1\n14,02,B,2.5,0\n"


def test_read_plate_layout(tmp_path):
    path = tmp_path / "plate_layout.csv"
    path.write_text(LAYOUT_CSV)
    layout = read_plate_layout(path)
    assert layout.columns.tolist() == ["well", "image_number", "dose", "control"]
    assert layout["well"].tolist() == ["A01", "A02", "A12", "B02"]
    assert layout["image_number"].tolist() == [1, 2, 3, 14]
    assert layout["dose"].tolist() == [0.0, 1.0, 10.0, 2.5]
    assert layout["control"].tolist() == [-1, 0, 1, 0]


def test_read_plate_layout_refuses_other_csvs(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("well,dose\nA01,1\n")
    with pytest.raises(ValueError, match="SBS_Doses"):
        read_plate_layout(path)


@pytest.fixture
def bbbc014_layout() -> Path:
    for candidate in default_data_candidates():
        if (candidate / "plate_layout.csv").is_file():
            return candidate / "plate_layout.csv"
    missing_data("BBBC014 plate_layout.csv not found (set MANTLE_DEMO_DATA)")


def test_read_the_bbbc014_layout(bbbc014_layout):
    layout = read_plate_layout(bbbc014_layout)
    assert len(layout) == 96 and layout["well"].is_unique
    assert set(layout["control"]) == {-1, 0, 1}
    assert layout.set_index("well").loc["A01", "image_number"] == 1
    assert layout.loc[layout["control"] == 0, "dose"].nunique() >= 5
