"""The web UI end to end, clicked in headless Chromium: `mantle ui` as a scientist meets it.

A real `mantle ui` (webserver and daemon) serves a real instance; a two-well BBBC014 plate is
registered with the CLI; the browser opens the asset graph, opens segmentation_masks, launches its
partition's materialisation with the Materialize button (no YAML) and waits for the run to succeed,
then finds the entity ids, the lineage table and the preview image in the partition's metadata.
Last, a backfill of that plate and a second one, each segmented with its own experiment's defaults.

Screenshots go to ``$MANTLE_TEST_ARTIFACTS/ui`` (CI keeps them) or the test's temporary directory.
The browser is Debian's ``/usr/bin/chromium`` (``apt-get install chromium``); Playwright never
downloads one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from mantle_assets.entities import EntityStore
from mantle_assets.orchestration.partitions import partition_key
from mantle_assets_tests.ui_server import running_ui

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
EXPERIMENT = "ui-plate"
SECOND_EXPERIMENT = "ui-plate-fixed-diameter"
RUN_SECONDS = 600  # a cold start of Cellpose on a busy CI machine, with room to spare
UI_TIMEOUT_MS = 120_000


def missing_browser(reason: str):
    """Skip without a browser, except where CI installed one (MANTLE_REQUIRE_BROWSER=1)."""
    if os.environ.get("MANTLE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (MANTLE_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@pytest.fixture
def sync_playwright():
    if not CHROMIUM.exists():
        missing_browser(f"no {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_browser("Python Playwright is not installed (pip install -e '.[test]')")
    return sync_playwright


@pytest.fixture
def artifacts(tmp_path) -> Path:
    root = os.environ.get("MANTLE_TEST_ARTIFACTS")
    folder = Path(root) / "ui" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {folder}")
    return folder


def mantle(*arguments: str, cwd: Path) -> str:
    """Run the installed ``mantle`` command like a person would, in the test's MANTLE_HOME."""
    command = [str(Path(sys.executable).with_name("mantle")), *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True, timeout=300).stdout


def wait_visible(locator, timeout_ms: int = 10_000) -> bool:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:
        locator.wait_for(state="visible", timeout=timeout_ms)
    except PlaywrightTimeoutError:
        return False
    return True


@pytest.fixture
def ui(mantle_home, bbbc014_crops, tmp_path):
    """`mantle ui` on a free port, with the crops registered as one image_directory partition.

    The new-image-directory and measurement sensors are stopped first (as a person can, in the UI
    or with `dagster sensor stop`), so that the only runs are the ones the browser launches.
    """
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    with running_ui(workdir, tmp_path / "mantle-ui.log") as (url, _):
        for sensor in ("new_image_directory_sensor", "segmented_directory_sensor"):
            subprocess.run(
                [sys.executable, "-m", "dagster", "sensor", "stop", sensor,
                 "-w", str(mantle_home / "dagster" / "workspace.yaml")],
                cwd=workdir, capture_output=True, text=True, check=True, timeout=300,
            )
        entity_id = mantle("register", str(bbbc014_crops), "--experiment", EXPERIMENT, cwd=workdir).split(":")[0]
        # The experiment segments nuclei in the DNA channel (green); the UI's run must pick that up.
        mantle("defaults", "--experiment", EXPERIMENT, "--nuclei-channel", "2", "--cytoplasm-channel", "2",
               cwd=workdir)
        yield url, entity_id, workdir


def test_launch_a_partition_then_a_backfill_from_the_ui(ui, sync_playwright, artifacts, bbbc014_crops, tmp_path):
    from playwright.sync_api import expect

    url, entity_id, workdir = ui
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            # Dagster greets a new instance with a newsletter dialog; dismiss it whenever it shows.
            page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda button: button.click())
            launch_dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")

            # The asset graph: every group, expanded (the graph's Alt+E shortcut).
            page.goto(f"{url}/asset-groups")
            expect(page.get_by_text("segmentation", exact=True).first).to_be_visible()
            page.keyboard.press("Alt+e")
            masks_node = page.get_by_text("segmentation_masks", exact=True).first
            expect(masks_node).to_be_visible()
            expect(page.get_by_text("image_directory", exact=True).first).to_be_visible()
            page.screenshot(path=artifacts / "01-asset-graph.png")

            # Open segmentation_masks: its description, then its page and its partition.
            # Dagster's newsletter dialog can pop up over the click: click until the node's panel shows.
            description = page.get_by_text("recorded as a segmentation_mask_directory entity")
            for _ in range(3):
                masks_node.click()
                if wait_visible(description):
                    break
            expect(description).to_be_visible()
            page.get_by_role("link", name="View in Asset Catalog").click()
            page.get_by_role("tab", name="Partitions").click()
            key = partition_key(EntityStore().get(entity_id))  # "E000001 ui-plate / <folder>"
            page.get_by_text(key, exact=True).first.click()
            expect(page.get_by_text("No metadata entries")).to_be_visible()  # not materialised yet
            page.screenshot(path=artifacts / "02-partition-missing.png")

            # Materialize with no config at all: the experiment's defaults apply.
            page.get_by_role("button", name="Materialize…").click()
            expect(launch_dialog.get_by_text("1 partition", exact=True)).to_be_visible()
            page.screenshot(path=artifacts / "03-launch-dialog.png")
            launch_dialog.get_by_role("button", name="Launch 1 run").click()
            toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}")).first
            expect(toast).to_be_visible()
            short_run_id = re.search(r"[0-9a-f]{8}", toast.inner_text()).group()

            # The run's page until it succeeds.
            page.goto(f"{url}/runs")
            page.get_by_role("link", name=short_run_id).first.click()
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=RUN_SECONDS * 1000)
            page.screenshot(path=artifacts / "04-run-succeeded.png")

            # The partition's latest materialisation: entity ids, lineage table, preview image.
            page.goto(f"{url}/assets/segmentation_masks?view=partitions&partition={urllib.parse.quote(key)}")
            metadata = page.locator("table").filter(has=page.get_by_text("output_entity", exact=True)).first
            expect(metadata).to_be_visible()
            output_id = metadata.locator("tr", has=page.get_by_text("output_entity", exact=True)).locator(
                "td").nth(1).inner_text().strip()
            assert re.fullmatch(r"E\d{6}", output_id) and output_id != entity_id
            input_row = metadata.locator("tr", has=page.get_by_text("input_entity", exact=True))
            expect(input_row.get_by_text(entity_id, exact=True)).to_be_visible()
            lineage_row = metadata.locator("tr", has=page.get_by_text("output_lineage", exact=True))
            expect(lineage_row.get_by_text("cellpose-segmentation").first).to_be_visible()
            page.screenshot(path=artifacts / "05-partition-metadata.png", full_page=True)

            # The contact sheet in place in the table, as mantle ui serves it from $MANTLE_HOME/previews.
            preview_row = metadata.locator("tr", has=page.get_by_text("preview", exact=True))
            expect(preview_row.get_by_text("Outlines on fields")).to_be_visible()
            image = preview_row.get_by_role("img", name="preview")
            expect(image).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            preview_row.scroll_into_view_if_needed()
            page.screenshot(path=artifacts / "06-preview.png")

            # A second plate of another experiment, whose defaults fix the diameter; both in one backfill.
            second_id = register_second_plate(bbbc014_crops, tmp_path / "second plate", workdir)
            page.goto(f"{url}/assets/segmentation_masks?view=partitions")
            page.get_by_role("button", name="Materialize…").click()
            launch_dialog.get_by_role("button", name="All", exact=True).click()
            expect(launch_dialog.get_by_text("2 partitions", exact=True)).to_be_visible()
            page.screenshot(path=artifacts / "07-backfill-dialog.png")
            launch_dialog.get_by_role("button", name="Launch backfill").click()
            expect(launch_dialog).to_be_hidden()
            page.goto(f"{url}/runs?view=backfills")  # the one backfill, which refreshes until it is done
            expect(page.get_by_text("2 partitions", exact=True)).to_be_visible()
            expect(page.get_by_text("Success", exact=True)).to_be_visible(timeout=2 * RUN_SECONDS * 1000)
            page.screenshot(path=artifacts / "08-backfill-succeeded.png")
        finally:
            browser.close()

    # What the browser showed is what the instance and the entity store hold.
    with DagsterInstance.get() as instance:
        (run,) = [r for r in instance.get_runs() if r.run_id.startswith(short_run_id)]
        assert run.status == DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == key
        assert "dagster/sensor_name" not in run.tags  # launched from the UI, not by automation
        # The asset's BackfillPolicy puts both partitions in one run: one model load for both.
        (backfill_run,) = [r for r in instance.get_runs() if "dagster/backfill" in r.tags]
        assert backfill_run.status == DagsterRunStatus.SUCCESS
        assert (backfill_run.tags["dagster/asset_partition_range_start"],
                backfill_run.tags["dagster/asset_partition_range_end"]) == (
            key, partition_key(EntityStore().get(second_id)))
    store = EntityStore()
    output = store.get(output_id)
    assert output.properties["source_entity"] == entity_id
    assert output.properties["total_cells"] > 0
    # The run, then the backfill, each made a version of the same masks entity.
    assert output.version == 2
    assert {edge.run_id for edge in store.parents(output_id)} == {run.run_id, backfill_run.run_id}
    # Each partition ran with its own experiment's defaults.
    assert (output.properties["nuclei_channel"], output.properties["diameter"]) == (2, "None")
    (second_masks,) = [e for e in store.list("segmentation_mask_directory")
                       if e.properties["source_entity"] == second_id]
    assert (second_masks.properties["nuclei_channel"], second_masks.properties["diameter"]) == (2, "12")
    assert second_masks.properties["run_id"] == backfill_run.run_id
    assert sorted(p.name for p in artifacts.glob("*.png")) == [
        "01-asset-graph.png", "02-partition-missing.png", "03-launch-dialog.png", "04-run-succeeded.png",
        "05-partition-metadata.png", "06-preview.png", "07-backfill-dialog.png", "08-backfill-succeeded.png"]


def register_second_plate(crops: Path, directory: Path, workdir: Path) -> str:
    """One well of the crops as another experiment's plate, segmented at a fixed 12 px diameter."""
    directory.mkdir()
    for image in crops.glob("*-12-A-12.tif"):
        shutil.copy(image, directory / image.name)
    entity_id = mantle("register", str(directory), "--experiment", SECOND_EXPERIMENT, cwd=workdir).split(":")[0]
    mantle("defaults", "--experiment", SECOND_EXPERIMENT, "--nuclei-channel", "2", "--cytoplasm-channel", "2",
           "--diameter", "12", cwd=workdir)
    return entity_id
