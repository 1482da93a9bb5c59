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
    normalise_well,
    plate_readout,
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
    assert layout.columns.tolist() == ["well", "treatment", "dose", "control"]
    assert layout["well"].tolist() == ["A01", "A02", "A12", "B02"]
    assert layout["treatment"].tolist() == ["", "", "", ""]
    assert layout["dose"].tolist() == [0.0, 1.0, 10.0, 2.5]
    assert layout["control"].tolist() == [-1, 0, 1, 0]


def test_read_a_generic_plate_layout(tmp_path):
    path = tmp_path / "layout.csv"
    path.write_text("Well,Treatment,Dose,Control\na1,DMSO,0,-1\nB07,TNFa,0.3,0\nh12, TNFa ,100,1\n")
    layout = read_plate_layout(path)
    assert layout["well"].tolist() == ["A01", "B07", "H12"]
    assert layout["treatment"].tolist() == ["DMSO", "TNFa", "TNFa"]
    assert layout["dose"].tolist() == [0.0, 0.3, 100.0]
    assert layout["control"].tolist() == [-1, 0, 1]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("well,dose\nA01,1\n", "expected columns well,dose,control"),
        ("well,dose,control\n", "lists no wells"),
        ("well,dose,control\nA01,1,0\nZ99,1,0\n", "line 3: 'Z99' is not a well name"),
        ("well,dose,control\nA01,-1,0\n", "line 2: '-1' is not a dose"),
        ("well,dose,control\nA01,high,0\n", "'high' is not a dose"),
        ("well,dose,control\nA01,1,2\n", "'2' is not a control flag"),
        ("well,dose,control\nA01,1,0\na1,2,0\n", "well A01 is listed more than once"),
    ],
)
def test_bad_plate_layouts_are_refused_in_one_line_naming_the_file(tmp_path, text, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_plate_layout(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and fragment in message, message


def test_a_missing_layout_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.csv: not a readable CSV"):
        read_plate_layout(tmp_path / "nope.csv")


@pytest.mark.parametrize(("name", "well"), [("A1", "A01"), (" h12", "H12"), ("b007", "B07"), ("AF48", "AF48")])
def test_normalise_well(name, well):
    assert normalise_well(name) == well


@pytest.mark.parametrize("name", ["A0", "A49", "1A", "ABC1", ""])
def test_normalise_well_refuses_non_wells(name):
    with pytest.raises(ValueError, match="not a well name"):
        normalise_well(name)


def synthetic_plate(rng, *, cells_per_well=60, noise=0.05):
    """Eight negative, eight positive and 3 x 9 dose-point wells of a known logistic response."""
    rows, layout = [], []
    wells = iter(f"{row}{column:02d}" for row in "ABCDEFGH" for column in range(1, 13))
    for control, dose in [(-1, 0.0)] * 8 + [(1, 100.0)] * 8 + [(0, d) for d in DOSES[1:] for _ in range(3)]:
        well = next(wells)
        layout.append({"well": well, "treatment": "TNFa", "dose": dose, "control": control})
        centre = {-1: TRUE["bottom"], 1: TRUE["top"]}.get(control) or four_parameter_logistic(dose, **TRUE)
        rows += [{"well": well, "ratio": v} for v in centre + rng.normal(0.0, noise, cells_per_well)]
    return pd.DataFrame(rows), pd.DataFrame(layout)


def test_plate_readout_recovers_the_known_curve_and_z_prime():
    objects, layout = synthetic_plate(np.random.default_rng(3))
    readout = plate_readout(objects, value_column="ratio", layout=layout, min_cells=10)

    assert readout.notes == {}
    assert readout.n_cells == len(objects)
    medians = objects.groupby("well")["ratio"].median()
    controls = layout.set_index("well")["control"]
    expected_z = z_prime(medians[controls == 1], medians[controls == -1])
    assert readout.z_prime == pytest.approx(expected_z)
    assert readout.z_prime > 0.9  # SD of a median of 60 cells is ~0.008 against a separation of 2.3
    low, high = readout.fit.ec50_ci95
    assert low < TRUE["ec50"] < high
    assert readout.fit.ec50 == pytest.approx(TRUE["ec50"], rel=0.1)
    assert readout.doses["dose"].tolist() == DOSES[1:].tolist()
    assert (readout.doses["n_wells"] == 3).all()
    summary = readout.to_json()
    assert summary["z_prime"] == readout.z_prime and summary["ec50"] == readout.fit.ec50
    assert len(summary["wells"]) == len(layout) and summary["wells"][0]["control"] == -1


def test_plate_readout_leaves_out_qc_failed_wells_and_says_why_parts_are_missing():
    objects, layout = synthetic_plate(np.random.default_rng(4))
    controls = layout[layout["control"] != 0]
    sparse = controls.groupby("control").head(7)["well"]  # all but one well of each control
    objects = objects[~objects["well"].isin(sparse) | (objects.groupby("well").cumcount() < 3)]
    objects = objects[objects["well"].isin(controls["well"])]
    readout = plate_readout(objects, value_column="ratio", layout=layout, min_cells=10,
                            expected_wells=controls["well"])
    assert readout.z_prime is None and readout.fit is None
    assert readout.notes["z_prime"] == "needs two used wells of each control, got 1 positive and 1 negative"
    assert readout.notes["fit"] == "no dose-point wells"
    wells = readout.wells.set_index("well")
    assert wells.loc[sparse, "too_few_cells"].all() and not wells.loc[sparse, "used"].any()

    no_layout = plate_readout(objects, value_column="ratio")
    assert no_layout.notes == {"z_prime": "no plate layout", "fit": "no plate layout"}
    assert no_layout.doses.empty and no_layout.n_cells == len(objects)


def test_plate_readout_needs_wells():
    with pytest.raises(ValueError, match="no object has a well"):
        plate_readout(pd.DataFrame({"well": [None], "ratio": [1.0]}), value_column="ratio")


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
    assert layout.set_index("well").loc["A01", "control"] == -1
    assert layout.loc[layout["control"] == 0, "dose"].nunique() >= 5
