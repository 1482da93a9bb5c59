import numpy as np
import pytest
import tifffile

from mantle_assets.demo import DemoDataError, prepare_plate, quick_wells

LAYOUT = """ImageNumber,Column,Row,SBS_Doses,SBS_Controls
1,01,A,0,-1
2,02,A,0,-1
3,03,A,1,0
4,04,A,10,1
5,05,A,0,-1
6,06,A,10,1
7,07,A,10,1
"""


@pytest.fixture
def plate(tmp_path):
    root = tmp_path / "bbbc014"
    (root / "images").mkdir(parents=True)
    (root / "plate_layout.csv").write_text(LAYOUT)
    for number, column in enumerate(["01", "02", "03", "04", "05", "06", "07"], start=1):
        for channel in (1, 2):
            name = f"Channel{channel}-{number:02d}-A-{column}.tif"
            tifffile.imwrite(root / "images" / name, np.zeros((4, 4), np.uint8))
    return root


def test_quick_wells_are_the_first_two_controls_of_each_kind(plate):
    assert quick_wells(plate / "plate_layout.csv") == ["01-A-01", "02-A-02", "04-A-04", "06-A-06"]


def test_quick_subset_links_both_channels_of_the_chosen_wells(plate, tmp_path):
    subset = prepare_plate(plate, all_wells=False, cache=tmp_path / "cache")
    names = sorted(p.name for p in subset.iterdir())
    assert names == sorted(f"Channel{c}-{w}.tif" for w in ("01-A-01", "02-A-02", "04-A-04", "06-A-06") for c in (1, 2))
    assert all(p.is_symlink() and p.resolve().parent == (plate / "images").resolve() for p in subset.iterdir())


def test_all_wells_is_the_plate_itself(plate, tmp_path):
    assert prepare_plate(plate, all_wells=True, cache=tmp_path / "cache") == plate / "images"


def test_a_folder_without_images_is_refused(tmp_path):
    with pytest.raises(DemoDataError, match="has no images/ folder"):
        prepare_plate(tmp_path, all_wells=True, cache=tmp_path / "cache")
