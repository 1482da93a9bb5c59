"""The scientist's whole job in the web UI, with no terminal after `mantle ui` (issue 15, "Done when").

A real `mantle ui` (webserver and daemon) on a fresh instance, clicked in headless Chromium: stop the
automatic sensors with their toggles; register a nine-well BBBC014 subset (controls of both kinds and
five doses) from the `register_image_directory` launchpad with its channel names, plate layout and
segmentation defaults, plus a plate of another experiment; find the subset by typing part of its name
into the Partitions tab's filter; materialise its masks and see the contact sheet and the counts per
field; launch `measurement_job` for it and read Z' on the assay_readout partition; then launch a
segmentation with ``nuclei_channel: 3`` on the two-channel plate and read the one-line reason on the
failed run's page, refused by the run queue before any step started. What the pages showed is then
compared with the entity store.

Screenshots go to ``$MANTLE_TEST_ARTIFACTS/ui-whole-job`` (CI keeps them) or the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import tifffile
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from mantle_assets.entities import EntityStore
from mantle_assets_tests.conftest import CROP, bbbc014_images, missing_data
from mantle_assets_tests.test_ui_browser import (  # noqa: F401
    CHROMIUM,
    RUN_SECONDS,
    UI_TIMEOUT_MS,
    sync_playwright,
    wait_visible,
)
from mantle_assets_tests.ui_server import running_ui

pytestmark = pytest.mark.slow

EXPERIMENT = "TNF dose response"
# BBBC014's plate_layout.csv: A01, A02 negative controls; A12, B12 positive controls; A03-A11 doses 1, 3, 5, 7, 9.
# Two wells of each control give Z', five distinct doses the dose-response fit.
SUBSET_WELLS = ("01-A-01", "02-A-02", "12-A-12", "24-B-12", "03-A-03", "05-A-05", "07-A-07", "09-A-09", "11-A-11")
OTHER_EXPERIMENT = "IL-1 time course"
OTHER_WELL = "13-B-01"
SENSORS = ("new_image_directory_sensor", "segmented_directory_sensor")
# A 160 px crop holds 15-30 nuclei, under the readout's default of 50 per well: the scientist lowers it at launch.
MIN_CELLS = 5


def crop_wells(directory: Path, wells) -> Path:
    """Both channels of ``wells`` cropped to ``CROP``, named as on the plate."""
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found (set MANTLE_DEMO_DATA)")
    directory.mkdir()
    for well in wells:
        for channel in (1, 2):
            pixels = tifffile.imread(images / f"Channel{channel}-{well}.tif")
            tifffile.imwrite(directory / f"Channel{channel}-{well}.tif", np.ascontiguousarray(pixels[CROP]))
    return directory


@pytest.fixture
def whole_job_artifacts(tmp_path) -> Path:
    root = os.environ.get("MANTLE_TEST_ARTIFACTS")
    folder = Path(root) / "ui-whole-job" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {folder}")
    return folder


def launchpad_yaml(page, text: str) -> None:
    """Replace the config in the page's (only) CodeMirror editor with ``text``, as if pasted."""
    page.locator(".CodeMirror").last.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(text)


def wait_for_run(page, outcome: str) -> str:
    """On a run's page: wait for its status badge to read ``outcome``; return the run id."""
    from playwright.sync_api import expect

    expect(page.get_by_text(outcome, exact=True).first).to_be_visible(timeout=RUN_SECONDS * 1000)
    return re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)


def open_launched_run(page, url: str) -> None:
    """After a launch from the Materialize dialog: follow its toast's run id to the run's page."""
    from playwright.sync_api import expect

    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}")).first
    expect(toast).to_be_visible()
    short_run_id = re.search(r"[0-9a-f]{8}", toast.inner_text()).group()
    page.goto(f"{url}/runs")
    page.get_by_role("link", name=short_run_id).first.click()


def register_in_launchpad(page, url: str, config: dict) -> str:
    """Launch register_image_directory with ``config`` typed as YAML; wait for success; return the run id."""
    page.goto(f"{url}/locations/mantle_assets/jobs/register_image_directory/playground")
    lines = ["ops:", "  register_directory:", "    config:"]
    for name, value in config.items():
        if isinstance(value, dict):
            lines += [f"      {name}:"] + [f"        {k}: {v}" for k, v in value.items()]
        else:
            # JSON is YAML: paths with spaces and lists come through quoted.
            lines.append(f"      {name}: {json.dumps(value)}")
    launchpad_yaml(page, "\n".join(lines) + "\n")
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url("**/runs/**")
    return wait_for_run(page, "Success")


def metadata_value(table, label: str) -> str:
    return table.locator("tr", has=table.page.get_by_text(label, exact=True)).first.locator("td").nth(1).inner_text()


def test_the_whole_job_in_the_browser(mantle_home, sync_playwright, whole_job_artifacts, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    shots = whole_job_artifacts
    subset = crop_wells(tmp_path / "TNF plate 1 subset", SUBSET_WELLS)
    other_plate = crop_wells(tmp_path / "IL-1 plate", [OTHER_WELL])
    layout = bbbc014_images().parent / "plate_layout.csv"
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    with running_ui(workdir, tmp_path / "mantle-ui.log") as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            # Dagster greets a new instance with a newsletter dialog; dismiss it whenever it shows.
            page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda button: button.click())

            # Only the runs the scientist launches: the automatic sensors off, with their toggles.
            for sensor in SENSORS:
                page.goto(f"{url}/locations/mantle_assets/sensors/{sensor}")
                running = page.locator("tr", has=page.get_by_text("Running", exact=True))
                expect(running.get_by_role("checkbox")).to_be_checked()
                running.locator("label").click()  # the switch's input is hidden behind its label
                expect(running.get_by_role("checkbox")).not_to_be_checked()
            page.goto(f"{url}/automation")
            expect(page.get_by_text(SENSORS[0], exact=True)).to_be_visible()
            page.screenshot(path=shots / "01-sensors-off.png")

            # Register the subset with channel names, layout and defaults; the diameter typed as a number.
            register_run_id = register_in_launchpad(page, url, {
                "directory": str(subset),
                "experiment_name": EXPERIMENT,
                "channel_names": ["NFkB", "DNA"],
                "plate_layout": str(layout),
                "segmentation_defaults": {"nuclei_channel": "DNA", "cytoplasm_channel": "DNA", "diameter": 17},
            })
            page.get_by_text("View full message").first.click()
            found = page.get_by_role("dialog").filter(has_text="ASSET_OBSERVATION")
            expect(found).to_be_visible()
            assert metadata_value(found, "fields") == str(len(SUBSET_WELLS))
            channels = found.locator("tr", has=page.get_by_text("channels", exact=True))
            for label, name in (("Channel1", "NFkB"), ("Channel2", "DNA")):
                expect(channels.locator("tr", has=page.get_by_text(label, exact=True)).get_by_text(
                    name, exact=True)).to_be_visible()
            assert metadata_value(found, "wells") == "A01, A02, A03, A05, A07, A09, A11, A12, B12"
            key = metadata_value(found, "partition")
            entity_id = metadata_value(found, "entity_id")
            assert key.startswith(entity_id) and EXPERIMENT in key
            found.screenshot(path=shots / "02-registered.png")
            found.get_by_role("button", name="Done").click()
            other_register_run_id = register_in_launchpad(
                page, url, {"directory": str(other_plate), "experiment_name": OTHER_EXPERIMENT})

            # Find the plate by part of its experiment's name; the other plate is filtered out.
            page.goto(f"{url}/assets/segmentation_masks?view=partitions")
            expect(page.get_by_title(re.compile(OTHER_EXPERIMENT))).to_be_visible()
            page.get_by_placeholder("Filter by name…").fill("tnf dose")
            expect(page.get_by_title(re.compile(OTHER_EXPERIMENT))).to_be_hidden()
            page.get_by_title(key, exact=True).click()
            expect(page.get_by_text("No metadata entries")).to_be_visible()  # not segmented yet
            page.screenshot(path=shots / "03-found-by-name.png")

            # Segment it with its defaults: Materialize, no config.
            page.get_by_role("button", name="Materialize…").click()
            launch_dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
            expect(launch_dialog.get_by_text("1 partition", exact=True)).to_be_visible()
            launch_dialog.get_by_role("button", name="Launch 1 run").click()
            open_launched_run(page, url)
            segmentation_run_id = wait_for_run(page, "Success")
            page.screenshot(path=shots / "04-segmentation-succeeded.png")

            # The contact sheet, inline, and the counts per field.
            page.goto(f"{url}/assets/segmentation_masks?view=partitions&partition={quote(key)}")
            metadata = page.locator("table").filter(has=page.get_by_text("objects_per_field", exact=True)).first
            preview_row = metadata.locator("tr", has=page.get_by_text("preview", exact=True))
            sheet = preview_row.get_by_role("img", name="preview")
            sheet.scroll_into_view_if_needed()
            expect(sheet).to_be_visible()
            assert sheet.evaluate("img => img.complete && img.naturalWidth") > 0
            page.screenshot(path=shots / "05-contact-sheet.png")
            counts_row = metadata.locator("tr", has=page.get_by_text("objects_per_field", exact=True)).first
            counts_row.scroll_into_view_if_needed()
            counts = {}
            for row in counts_row.locator("table tr").all():
                cells = [cell.inner_text().strip() for cell in row.locator("td").all()]
                if cells:
                    counts[cells[0]] = int(cells[2])
            page.screenshot(path=shots / "06-counts.png")

            # Measure it: measurement_job's launchpad, partition picked by name, min_cells lowered for the crops.
            page.goto(f"{url}/locations/mantle_assets/jobs/measurement_job/playground")
            partition_box = page.get_by_placeholder("Partition")
            choice = page.get_by_role("menuitem", name=key)
            # Under load the picker can mount before its partitions arrive and keep an empty menu: type again.
            for _ in range(3):
                partition_box.fill("")
                partition_box.fill("tnf dose")
                if wait_visible(choice, 30_000):
                    break
            choice.click()
            expect(page.get_by_text(f"partition: {key}")).to_be_visible()
            launchpad_yaml(page, f"ops:\n  assay_readout:\n    config:\n      min_cells: {MIN_CELLS}\n")
            page.screenshot(path=shots / "07-measurement-launchpad.png")
            page.get_by_role("button", name="Launch Run").click()
            page.wait_for_url("**/runs/**")
            measurement_run_id = wait_for_run(page, "Success")

            # Z' on the readout's partition, rounded for people.
            page.goto(f"{url}/assets/assay_readout?view=partitions&partition={quote(key)}")
            readout = page.locator("table").filter(has=page.get_by_text("z_prime", exact=True)).first
            expect(readout).to_be_visible()
            shown_z_prime = metadata_value(readout, "z_prime").strip()
            page.screenshot(path=shots / "08-readout.png")

            # A parameter that cannot work: nuclei channel 3 of a two-channel plate, typed at launch.
            page.goto(f"{url}/assets/segmentation_masks?view=partitions&partition={quote(key)}")
            page.get_by_role("button", name="Materialize…").click()
            launch_dialog.get_by_text("Config", exact=True).click()
            launch_dialog.get_by_role("button", name="Add config").click()
            config_editor = page.get_by_role("dialog").filter(has_text="Config Editor")
            launchpad_yaml(page, "ops:\n  segmentation_masks:\n    config:\n      nuclei_channel: 3\n")
            page.screenshot(path=shots / "09-bad-parameter.png")
            config_editor.get_by_role("button", name="Save config").click()
            launch_dialog.get_by_role("button", name="Launch 1 run").click()
            open_launched_run(page, url)
            failed_run_id = wait_for_run(page, "Failure")
            # Refused by the run queue before it was queued: the run's one event is its failure, whose message is
            # the reason, with no step started and no stack trace under it.
            expect(page.get_by_text("RUN_FAILURE", exact=True)).to_have_count(1)
            expect(page.get_by_text("nuclei_channel=3 but the images have 2 channel(s)", exact=True)).to_be_visible()
            expect(page.get_by_text("STEP_START", exact=True)).to_have_count(0)
            expect(page.get_by_text(re.compile("Traceback|dagster._core.errors"))).to_have_count(0)
            page.screenshot(path=shots / "10-bad-parameter-reason.png")
        finally:
            browser.close()

    # What the pages showed is what the instance and the entity store hold.
    with DagsterInstance.get() as instance:
        runs = {run_id: instance.get_run_by_id(run_id) for run_id in (
            register_run_id, segmentation_run_id, measurement_run_id, failed_run_id)}
        assert [run.status for run in runs.values()] == [DagsterRunStatus.SUCCESS] * 3 + [DagsterRunStatus.FAILURE]
        assert not instance.get_records_for_run(failed_run_id, of_type=DagsterEventType.RUN_ENQUEUED).records
        # With the sensors off, the runs launched in the browser are the only ones (a nightly schedule may tick).
        assert {run.run_id for run in instance.get_runs() if "dagster/schedule_name" not in run.tags} == {
            other_register_run_id, *runs}
    store = EntityStore()
    plate = store.get(entity_id)
    assert plate.properties["channel_names"] == ["NFkB", "DNA"]
    assert plate.properties["segmentation_defaults"]["diameter"] in (17, "17")
    (masks,) = store.list("segmentation_mask_directory")
    assert masks.properties["source_entity"] == entity_id
    assert (masks.properties["nuclei_channel"], masks.properties["run_id"]) == (2, segmentation_run_id)
    assert counts == masks.properties["cells_per_field"] and sum(counts.values()) > 0
    (readout_entity,) = store.list("assay_readout")
    assert readout_entity.properties["run_id"] == measurement_run_id
    assert readout_entity.properties["z_prime"] is not None
    assert float(shown_z_prime) == round(readout_entity.properties["z_prime"], 3)
    assert sorted(p.name for p in shots.glob("*.png")) == [
        "01-sensors-off.png", "02-registered.png", "03-found-by-name.png", "04-segmentation-succeeded.png",
        "05-contact-sheet.png", "06-counts.png", "07-measurement-launchpad.png", "08-readout.png",
        "09-bad-parameter.png", "10-bad-parameter-reason.png"]
