"""Naming schemes: every instrument's names parsed into field, channel, well, site, plane and time point."""

from pathlib import PurePosixPath

import pytest

from mantle_assets.imaging.naming import (
    SCHEMES,
    NamingError,
    channel_like_pair,
    parse_name,
    user_scheme,
    well_of,
)

SCHEME = {scheme.name: scheme for scheme in SCHEMES}


def parse(scheme_name: str, path: str):
    return parse_name(SCHEME[scheme_name], PurePosixPath(path))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_every_scheme_reads_its_own_example(scheme):
    parsed = parse_name(scheme, PurePosixPath(scheme.example + ".tif"))
    assert parsed is not None
    assert parsed.channel is not None
    assert parsed.channel not in parsed.field


@pytest.mark.parametrize(
    ("scheme", "path", "expected"),
    [
        ("bbbc014", "Channel2-12-A-12.tif", ("12-A-12", "Channel2", "A12", None, None, None)),
        (
            "metaxpress",
            "TimePoint_1/ZStep_2/Plate1_B03_s4_w2.TIF",
            ("Plate1_B03_s4", "w2", "B03", "s4", "ZStep_2", "TimePoint_1"),
        ),
        (
            "metaxpress",
            "IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E4AD1E4C1AB.tif",
            ("IXMtest_A02_s1", "w1", "A02", "s1", None, None),
        ),
        ("metaxpress", "Plate1_P24_w3.tif", ("Plate1_P24", "w3", "P24", None, None, None)),
        ("imagexpress", "Plate1_t3_AB07_s2_w1_z5.tif", ("Plate1_AB07_s2", "w1", "AB07", "s2", "z5", "t3")),
        ("operetta", "r08c12f03p02-ch4sk7fk1fl1.tiff", ("r08c12f03", "ch4", "H12", "f03", "p02", "sk7")),
        ("operetta", "r01c01f01p01-ch2.tiff", ("r01c01f01", "ch2", "A01", "f01", "p01", None)),
        (
            "yokogawa",
            "Plate1_C05_T0002F003L01A02Z04C03.tif",
            ("Plate1_C05_F003L01", "C03", "C05", "F003", "Z04", "T0002"),
        ),
        (
            "cellomics",
            "MFGTMP_150303150001_H11f12d3.TIF",
            ("MFGTMP_150303150001_H11f12", "d3", "H11", "f12", None, None),
        ),
        ("incell", "B - 03(fld 2 wv UV - DAPI).tif", ("B - 03(fld 2)", "UV - DAPI", "B03", "2", None, None)),
        (
            "incell",
            "C - 10(fld 1 wv Green - dsRed z 3 time 2 - 500 ms).tif",
            ("C - 10(fld 1)", "Green - dsRed", "C10", "1", "z 3", "time 2 - 500 ms"),
        ),
    ],
)
def test_instrument_names_are_parsed(scheme, path, expected):
    parsed = parse(scheme, path)
    assert (parsed.field, parsed.channel, parsed.well, parsed.site, parsed.plane, parsed.timepoint) == expected


@pytest.mark.parametrize(
    ("scheme", "path"),
    [
        ("metaxpress", "Plate1_A01_s1.tif.txt"),
        ("operetta", "r01c01f01-ch1.tiff"),  # no plane
        ("yokogawa", "Plate1_A01_T0001F001L01A01Z01.tif"),  # no channel
        ("cellomics", "Plate1_A01f00.tif"),
        ("bbbc014", "Channel1-01-Q-01.tif"),  # no row Q on a 384-well plate
    ],
)
def test_names_of_other_layouts_do_not_match(scheme, path):
    assert parse(scheme, path) is None


def test_the_metaxpress_guid_is_not_read_as_wavelength_digits():
    # "w10" followed by a GUID that starts with a digit must stay wavelength 10.
    parsed = parse("metaxpress", "P_A01_s1_w10051DAA7C-7042-435F-99F0-1E4AD1E4C1AB.tif")
    assert parsed.channel == "w10"


def test_folders_that_are_not_time_points_or_planes_prefix_the_field_name():
    parsed = parse("metaxpress", "A01/TimePoint_2/Plate1_A01_s1_w1.tif")
    assert (parsed.field, parsed.timepoint) == ("A01_Plate1_A01_s1", "TimePoint_2")


def test_a_user_pattern_reads_folders_when_it_holds_a_slash():
    scheme = user_scheme(r"(?P<well>[A-H]\d\d)/field(?P<field>\d+)_(?P<channel>DAPI|GFP)")
    parsed = parse_name(scheme, PurePosixPath("B07/field3_GFP.png"))
    assert (parsed.field, parsed.channel, parsed.well, parsed.site) == ("B07_field3", "GFP", "B07", "3")


def test_a_user_pattern_without_a_slash_reads_the_file_name():
    scheme = user_scheme(r"(?P<well>[A-H]\d\d)-(?P<channel>\w+)")
    parsed = parse_name(scheme, PurePosixPath("run 2/C03-Mito.tif"))
    assert (parsed.field, parsed.channel, parsed.well) == ("run 2_C03", "Mito", "C03")


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(?P<well>[A-H]", "is not a regular expression"),
        (r"(?P<wel>[A-H]\d\d)", "unknown group 'wel'"),
        (r"[A-H]\d\d_w\d", "has no named group"),
    ],
)
def test_unusable_user_patterns_are_refused_in_one_line(pattern, message):
    with pytest.raises(NamingError, match=message) as caught:
        user_scheme(pattern)
    assert "\n" not in str(caught.value)


def test_a_pattern_that_cuts_the_whole_name_is_refused():
    with pytest.raises(NamingError, match="leaves no field name"):
        parse_name(user_scheme(r"(?P<channel>.+)"), PurePosixPath("DAPI.tif"))


@pytest.mark.parametrize(
    ("names", "kind"),
    [
        (["P1_A01f00d0", "P1_A01f00d1"], "channel"),
        (["r01c01f01p01-ch1sk1", "r01c01f01p01-ch2sk1"], "channel"),
        (["P_A01_T0001F001L01A01Z01C01", "P_A01_T0001F001L01A01Z01C02"], "channel"),
        (["A - 01(fld 1 wv UV - DAPI)", "A - 01(fld 1 wv Blue - FITC)"], "channel"),
        (["well A1 DAPI", "well A1 FITC"], "channel"),
        (["stack_z01", "stack_z02"], "plane or time point"),
        (["movie_t1", "movie_t2"], "plane or time point"),
    ],
)
def test_names_that_differ_by_a_channel_like_token_are_found(names, kind):
    assert channel_like_pair(["unrelated", *names]) == (names[0], names[1], kind)


@pytest.mark.parametrize(
    "names",
    [
        ["r01c01f01", "r01c02f01", "r02c01f01"],  # Operetta columns, not channels
        ["01-A-01", "02-A-02"],
        ["img_s1", "img_s2"],  # sites
        ["field_001", "field_002"],
        ["img_w1"],
    ],
)
def test_names_of_distinct_fields_are_not_taken_for_channels(names):
    assert channel_like_pair(names) is None


@pytest.mark.parametrize(
    ("name", "well"),
    [
        ("01-A-01", "A01"),
        ("01-H-12", "H12"),
        ("IXMtest_A02_s1", "A02"),
        ("plate1_P24_s3", "P24"),
        ("r02c03f01p01", "B03"),
        ("r16c24f09p01-ch1sk1fk1fl1", "P24"),
        ("B3_pos01", "B03"),
        ("AF48_s1", "AF48"),
        ("image_0001", None),
        ("pos01", None),
        ("sample", None),
        ("x_s1", None),
    ],
)
def test_well_of_guesses_wells_of_names_no_scheme_parsed(name, well):
    assert well_of(name) == well
