"""The `mantle` command, run as a user runs it: a subprocess against fresh state."""

import json
import os
import subprocess
import sys

import duckdb
import numpy as np
import pytest
import tifffile
from dagster import DagsterInstance

from mantle_assets_tests.conftest import CROP, bbbc014_images, missing_data

pytestmark = pytest.mark.slow


def mantle(*args, check=True):
    completed = subprocess.run(
        [sys.executable, "-m", "mantle_assets.cli", *args],
        capture_output=True, text=True, env=os.environ.copy(), timeout=900,
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"mantle {' '.join(args)} failed:\n{completed.stderr}")
    return completed


def register(*args) -> str:
    """``mantle register``'s entity id: what its line starts with, before what was found."""
    return mantle("register", *args).stdout.split(":")[0]


def dagster_runs(mantle_home):
    with DagsterInstance.from_config(str(mantle_home / "dagster")) as instance:
        return instance.get_runs()


def test_register_then_segment_round_trip(bbbc014_crops, bundled_model_name, mantle_home):
    entity_id = register(str(bbbc014_crops), "--experiment", "dose ends")
    assert entity_id == "E000001"
    shown = json.loads(mantle("show", entity_id, "--json").stdout)
    grouping = shown["properties"]["field_grouping"]
    assert (grouping["n_fields"], grouping["n_channels"]) == (2, 2)

    segment = ("segment", entity_id, "--cellpose-model", bundled_model_name, "--nuclei-channel", "2",
               "--cytoplasm-channel", "2", "--diameter", "None")
    quiet = mantle(*segment)
    (masks,) = json.loads(mantle("entities", "--type", "segmentation_mask_directory", "--json").stdout)
    (run,) = dagster_runs(mantle_home)
    assert run.job_name == "segmentation_job"
    assert run.tags["dagster/partition"] == f"{entity_id} dose ends / {bbbc014_crops.name}"
    # Progress, one line per field as the step logs it, and the result; no Dagster events, no telemetry notice.
    progress = [line for line in quiet.stderr.splitlines() if not line.startswith("loaded model")]
    cells = masks["properties"]["cells_per_field"]
    assert [line.split(" objects in ")[0] for line in progress] == [f"{f}: {n}" for f, n in cells.items()]
    assert quiet.stdout.startswith(f"{masks['entity_id']}: {masks['properties']['total_cells']} objects in 2 fields")

    with duckdb.connect(str(mantle_home / "mantle.duckdb"), read_only=True) as db:
        entities = dict(db.execute("SELECT entity_id, data_type FROM entities").fetchall())
        lineage = db.execute("SELECT parent_id, child_id, pipeline, run_id FROM lineage").fetchall()
    assert entities == {entity_id: "image_directory", masks["entity_id"]: "segmentation_mask_directory"}
    assert lineage == [(entity_id, masks["entity_id"], "cellpose-segmentation", run.run_id)]

    # The quiet run recorded no telemetry, so the first verbose one is where Dagster announces it.
    verbose = mantle("--verbose", *segment).stderr
    assert " - DEBUG - segmentation_job - " in verbose and "STEP_START" in verbose
    assert "Telemetry:" in verbose and "telemetry:\n      enabled: false" in verbose
    verbose_run = dagster_runs(mantle_home)[0].run_id  # the newest run comes first
    assert all(f" - INFO - segmentation_job - {verbose_run} - segmentation_masks - {field}: " in verbose
               for field in cells)


def test_unknown_model_exits_non_zero_and_records_nothing(bbbc014_crops, mantle_home):
    entity_id = register(str(bbbc014_crops), "--experiment", "x")
    failed = mantle("segment", entity_id, "--cellpose-model", "nosuchmodel", "--nuclei-channel", "2",
                    "--cytoplasm-channel", "2", "--diameter", "None", check=False)
    assert failed.returncode != 0
    error_lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and "unknown cellpose_model 'nosuchmodel'" in error_lines[0]
    assert [e["entity_id"] for e in json.loads(mantle("entities", "--json").stdout)] == [entity_id]
    assert dagster_runs(mantle_home) == []


def test_register_refuses_a_directory_without_images(tmp_path, mantle_home):
    empty = tmp_path / "nothing here"
    empty.mkdir()
    failed = mantle("register", str(empty), check=False)
    assert failed.returncode != 0 and "no images in" in failed.stderr
    assert json.loads(mantle("entities", "--json").stdout) == []


def test_register_takes_a_uri(bbbc014_crops, s3, mantle_home):
    uri = s3.put_directory(bbbc014_crops, "plates/crops")
    entity_id = register(uri, "--experiment", "remote")
    shown = json.loads(mantle("show", entity_id, "--json").stdout)
    assert (shown["name"], shown["properties"]["image_directory"]) == ("crops", "s3://lab/plates/crops")
    failed = mantle("register", s3.uri("plates/nothing"), check=False)
    assert failed.returncode != 0
    assert failed.stderr.strip() == "Error: image directory s3://lab/plates/nothing does not exist"


ONE_FIELD = "1 field x 2 channels (Channel1, Channel2), wells A01, scheme bbbc014"


def two_channel_plate(directory):
    directory.mkdir()
    for channel in (1, 2):
        tifffile.imwrite(directory / f"Channel{channel}-01-A-01.tif", np.zeros((16, 16), np.uint8))
    return directory


def test_registering_a_registered_directory_prints_its_id_with_a_note(tmp_path, mantle_home):
    plate = two_channel_plate(tmp_path / "plate")
    link = tmp_path / "link"
    link.symlink_to(plate)
    assert mantle("register", str(plate), "--experiment", "TNF").stdout == f"E000001: {ONE_FIELD}\n"
    for spelling in (str(plate), f"{plate}/", str(link)):
        again = mantle("register", spelling, "--experiment", "TNF")
        assert again.stdout == f"E000001: {ONE_FIELD}\n"
        where = "" if spelling == str(plate) else f" (as {plate})"
        assert again.stderr == (
            f"note: {spelling} is already registered as E000001{where}; pass --again to register it anew\n")
    other = mantle("register", str(link), "--experiment", "IL-1", "--channel-names", "p65,DNA", check=False)
    assert (other.returncode, other.stdout) == (1, "")
    assert other.stderr == (
        f"Error: {link} is already registered as E000001 with experiment_name 'TNF', not 'IL-1' and no channel_names, "
        "not ['p65', 'DNA']; pass --again to register it anew with these\n")
    assert mantle("register", str(link), "--experiment", "IL-1", "--again").stdout == f"E000002: {ONE_FIELD}\n"
    mantle("archive", "E000002")
    mantle("archive", "E000001")
    assert mantle("register", str(plate)).stdout == f"E000003: {ONE_FIELD}\n"
    listed = json.loads(mantle("entities", "--archived", "--json").stdout)
    assert [(e["entity_id"], e["archived"], e["properties"].get("experiment_name")) for e in listed] == [
        ("E000001", True, "TNF"), ("E000002", True, "IL-1"), ("E000003", False, None)]


def test_segmentation_options_are_read_like_the_inbox_sidecar(tmp_path, mantle_home):
    entity_id = register(str(two_channel_plate(tmp_path / "plate")))
    for value in ("abc", "true"):
        refused = mantle("defaults", entity_id, "--diameter", value, check=False)
        assert (refused.returncode, refused.stderr) == (
            1, f"Error: diameter must be a number of pixels or None, got {value!r}\n")
    refused = mantle("segment", entity_id, "--diameter", "abc", check=False)
    assert refused.stderr == "Error: diameter must be a number of pixels or None, got 'abc'\n"
    assert dagster_runs(mantle_home) == []
    for value, recorded in (("12", "12"), ("none", "None")):
        printed = json.loads(mantle("defaults", entity_id, "--diameter", value).stdout.split(": ", 1)[1])
        assert printed["diameter"] == recorded
        assert json.loads(mantle("show", entity_id, "--json").stdout)["properties"]["segmentation_defaults"] == {
            "diameter": recorded}


def test_models_json_lists_bundled_offline(bundled_model_name):
    listed = {m["name"]: m for m in json.loads(mantle("models", "--json").stdout)}
    assert listed[bundled_model_name]["offline"] is True
    assert listed[bundled_model_name]["kind"] == "bundled"
    assert os.path.isfile(listed[bundled_model_name]["path"])
    assert {"nuclei", "cyto3"} <= set(listed)


def test_demo_json_ends_with_the_plate_readout(tmp_path, bundled_model_name, mantle_home):
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found (set MANTLE_DEMO_DATA)")
    plate = tmp_path / "cropped plate"
    (plate / "images").mkdir(parents=True)
    (plate / "plate_layout.csv").write_text((images.parent / "plate_layout.csv").read_text())
    for well in ("01-A-01", "02-A-02", "12-A-12", "24-B-12"):  # the quick subset's wells
        for channel in (1, 2):
            pixels = tifffile.imread(images / f"Channel{channel}-{well}.tif")
            tifffile.imwrite(plate / "images" / f"Channel{channel}-{well}.tif", np.ascontiguousarray(pixels[CROP]))

    completed = mantle("demo", "--data", str(plate), "--cellpose-model", bundled_model_name, "--json")
    readout = json.loads(completed.stdout)
    assert {"z_prime", "ec50", "n_cells", "wells"} <= set(readout)
    assert [w["well"] for w in readout["wells"]] == ["A01", "A02", "A12", "B12"]
    assert readout["n_cells"] == sum(w["n_cells"] for w in readout["wells"]) > 0
    assert readout["readout"] == "NFkB_ratio" and readout["ec50"] is None
    assert readout["notes"]["fit"] == "no dose-point wells"
    assert "cell_measurement_table" in completed.stderr
    # Progress of segmentation ("objects in 1.2 s") and of measurement, per field; no Dagster events.
    for part in ("01-A-01: ", "24-B-12: ", " objects in ", " objects measured"):
        assert part in completed.stderr
    assert " - DEBUG - " not in completed.stderr

    lines = mantle("demo", "--data", str(plate), "--cellpose-model", bundled_model_name).stdout.splitlines()
    # 160 px crops hold under min_cells (50) nuclei per well, so no well counts towards Z'.
    assert "  Z': not computed (needs two used wells of each control, got 0 positive and 0 negative)" in lines
    assert "  EC50: not computed (no dose-point wells)" in lines
    grid = lines[lines.index("  cells per well:") + 1:][:3]
    assert grid[0].split() == ["1", "2", "12"] and [row.split()[0] for row in grid[1:]] == ["A", "B"]
    counts = {w["well"]: w["n_cells"] for w in readout["wells"]}
    assert grid[2].split() == ["B", "-", "-", str(counts["B12"])]


def test_whole_cell_request_to_the_nuclei_model_is_refused_before_a_run(bbbc014_crops, bundled_model_name,
                                                                        mantle_home):
    entity_id = register(str(bbbc014_crops), "--channel-names", "NFkB,DNA")
    shown = mantle("show", entity_id, "--json").stdout
    failed = mantle("segment", entity_id, "--cellpose-model", bundled_model_name, "--nuclei-channel", "DNA",
                    "--cytoplasm-channel", "NFkB", check=False)
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [
        f"Error: cellpose_model '{bundled_model_name}' segments nuclei in one channel, but cytoplasm_channel=1 "
        "differs from nuclei_channel=2 (a whole-cell request): to segment nuclei set cytoplasm_channel equal to "
        "nuclei_channel (both 2); for whole cells use a whole-cell model such as cyto3 or a model file"]
    assert mantle("show", entity_id, "--json").stdout == shown
    assert [e["entity_id"] for e in json.loads(mantle("entities", "--json").stdout)] == [entity_id]
    assert dagster_runs(mantle_home) == []
    assert not (mantle_home / "masks").exists()


def test_a_plate_without_objects_fails_and_records_nothing(tmp_path, bundled_model_name, mantle_home):
    plate = tmp_path / "blank plate"
    plate.mkdir()
    for well in ("01-A-01", "02-A-02"):
        for channel in (1, 2):
            tifffile.imwrite(plate / f"Channel{channel}-{well}.tif", np.zeros((160, 160), np.uint16))
    entity_id = register(str(plate), "--experiment", "blank")

    failed = mantle("segment", entity_id, "--cellpose-model", bundled_model_name, "--nuclei-channel", "2",
                    "--cytoplasm-channel", "2", check=False)

    assert failed.returncode == 1
    (run,) = dagster_runs(mantle_home)
    assert failed.stderr.splitlines()[-1] == (
        f"Error: segmentation_job run {run.run_id} failed: "
        f"0 objects in all 2 fields with {bundled_model_name} (nuclei_channel=2, cytoplasm_channel=2, "
        "diameter=None): check the channel and diameter")
    assert "Stack Trace" not in failed.stderr and " - ERROR - " not in failed.stderr  # those are for --verbose
    assert [e["entity_id"] for e in json.loads(mantle("entities", "--json").stdout)] == [entity_id]
    assert json.loads(mantle("show", entity_id, "--json").stdout)["children"] == []
    assert not (mantle_home / "masks" / entity_id).exists()


def test_channels_by_name_on_a_five_channel_plate(tmp_path, bundled_model_name, mantle_home):
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found (set MANTLE_DEMO_DATA)")
    nfkb, dna = (tifffile.imread(images / f"Channel{c}-01-A-01.tif")[CROP] for c in (1, 2))
    noise = np.random.default_rng(0).integers(0, 255, (3, *dna.shape)).astype(dna.dtype)
    plate = tmp_path / "cell painting"
    plate.mkdir()
    tifffile.imwrite(plate / "01-A-01.tif", np.stack([nfkb, *noise, dna]))
    entity_id = register(str(plate), "--channel-names", "NFkB,ER,RNA,AGP,DNA")

    mantle("segment", entity_id, "--cellpose-model", bundled_model_name, "--nuclei-channel", "dna",
           "--cytoplasm-channel", "DNA", "--diameter", "12")

    (masks,) = json.loads(mantle("entities", "--type", "segmentation_mask_directory", "--json").stdout)
    props = masks["properties"]
    assert (props["nuclei_channel"], props["cytoplasm_channel"], props["total_cells"] >= 10) == (5, 5, True)
    failed = mantle("segment", entity_id, "--nuclei-channel", "Mito", check=False)
    assert failed.returncode == 1 and failed.stderr.splitlines() == [
        "Error: nuclei_channel='Mito' names no channel; the channels are 1 NFkB, 2 ER, 3 RNA, 4 AGP, 5 DNA"]


def test_defaults_by_channel_name_are_resolved_per_directory(tmp_path, mantle_home):
    entity_ids = []
    for plate, names in (("plate a", "NFkB,DNA"), ("plate b", "DNA,GFP")):
        for channel in (1, 2):
            (tmp_path / plate).mkdir(exist_ok=True)
            tifffile.imwrite(tmp_path / plate / f"Channel{channel}-01-A-01.tif", np.zeros((16, 16), np.uint8))
        entity_ids.append(register(str(tmp_path / plate), "--experiment", "exp",
                                 "--channel-names", names))

    def recorded():
        return [json.loads(mantle("show", e, "--json").stdout)["properties"]["segmentation_defaults"]
                for e in entity_ids]

    lines = mantle("defaults", "--experiment", "exp", "--nuclei-channel", "DNA", "--cytoplasm-channel", "dna"
                   ).stdout.splitlines()
    assert [json.loads(line.split(": ", 1)[1])["nuclei_channel"] for line in lines] == [2, 1]
    assert recorded() == [{"nuclei_channel": 2, "cytoplasm_channel": 2}, {"nuclei_channel": 1, "cytoplasm_channel": 1}]

    # NFkB is channel 1 of plate a and no channel of plate b: refused, and neither plate changes.
    failed = mantle("defaults", "--experiment", "exp", "--nuclei-channel", "NFkB", check=False)
    assert failed.returncode == 1 and failed.stderr.splitlines() == [
        f"Error: {entity_ids[1]}: nuclei_channel='NFkB' names no channel; the channels are 1 DNA (Channel1), "
        "2 GFP (Channel2)"]
    failed = mantle("defaults", entity_ids[0], "--cytoplasm-channel", "3", check=False)
    assert failed.stderr.splitlines() == [
        f"Error: {entity_ids[0]}: cytoplasm_channel=3 but the images have 2 channel(s)"]
    assert recorded() == [{"nuclei_channel": 2, "cytoplasm_channel": 2}, {"nuclei_channel": 1, "cytoplasm_channel": 1}]


def test_register_says_what_it_found_and_takes_a_pattern(tmp_path, mantle_home):
    operetta = tmp_path / "operetta"
    operetta.mkdir()
    for column in (1, 12):
        for channel in (1, 2):
            name = f"r01c{column:02d}f01p01-ch{channel}sk1fk1fl1.tiff"
            tifffile.imwrite(operetta / name, np.zeros((16, 16), np.uint8))
    assert mantle("register", str(operetta)).stdout == (
        "E000001: 2 fields x 2 channels (ch1, ch2), wells A01, A12, plane p01, time point sk1, scheme operetta\n")

    lab = tmp_path / "lab"
    lab.mkdir()
    for channel in ("GFP", "Hoechst"):
        tifffile.imwrite(lab / f"B7-{channel}.tif", np.zeros((16, 16), np.uint8))
    refused = mantle("register", str(lab), check=False)
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert "B7-GFP and B7-Hoechst differ only by what looks like a channel" in refused.stderr
    assert "--pattern" in refused.stderr

    pattern = r"(?P<well>[A-H]\d+)-(?P<channel>\w+)"
    shown = json.loads(mantle("register", str(lab), "--pattern", pattern, "--json").stdout)
    assert shown["entity_id"] == "E000002" and not shown["already_registered"]
    assert shown["summary"] == "1 field x 2 channels (GFP, Hoechst), wells B07, scheme pattern"
    assert shown["properties"]["field_grouping"]["naming_pattern"] == pattern
    segmented = mantle("segment", "E000002", "--nuclei-channel", "hoechst", "--cytoplasm-channel", "Hoechst",
                       "--diameter", "12", check=False)
    # Read with the recorded pattern at run time too: the blank field is segmented (and found empty).
    assert "0 objects in the only field" in segmented.stderr.splitlines()[-1]


# Runs a command in-process, then prints which heavy packages it had imported by the end.
IMPORTED_BY = """
import sys
from mantle_assets.cli import main
main({arguments!r}, standalone_mode=False)
print(sorted(name for name in ("numpy", "pandas", "dagster", "torch", "cellpose") if name in sys.modules))
"""


def test_listing_and_showing_entities_import_neither_science_nor_dagster(mantle_home, tmp_path):
    # Start-up is most of what these commands take (benchmarks/scale.py); numpy alone would add a third.
    plate = tmp_path / "plate"
    plate.mkdir()
    tifffile.imwrite(plate / "A01_s1.tif", np.zeros((8, 8), np.uint8))
    entity_id = register(str(plate))
    for arguments in (["entities", "--json"], ["entities"], ["show", entity_id], ["show", entity_id, "--json"]):
        completed = subprocess.run([sys.executable, "-c", IMPORTED_BY.format(arguments=arguments)],
                                   capture_output=True, text=True, env=os.environ.copy(), timeout=300, check=True)
        assert entity_id in completed.stdout
        assert completed.stdout.splitlines()[-1] == "[]", (arguments, completed.stdout.splitlines()[-1])
