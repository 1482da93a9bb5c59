"""Shared fixtures: isolated Mantle/Dagster homes and crops of the BBBC014 demo plate."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from dagster import DagsterInstance

from mantle_assets.demo import default_data_candidates

# One throwaway PostgreSQL server per session, for every test that asks (a module importing these would start its own).
from mantle_assets_tests.postgres import postgres_database, postgres_server  # noqa: F401 (fixtures pytest finds here)

CROP = (slice(200, 360), slice(200, 360))
TWO_WELLS = ("01-A-01", "12-A-12")


def bbbc014_images() -> Path | None:
    for candidate in default_data_candidates():
        if (candidate / "images").is_dir():
            return candidate / "images"
    return None


def missing_data(reason: str):
    """Skip for lack of shared data, except in CI (MANTLE_REQUIRE_DATA=1), where it is a failure."""
    if os.environ.get("MANTLE_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason} (MANTLE_REQUIRE_DATA=1)")
    pytest.skip(reason)


EIGHT_WELLS = ("01-A-01", "02-A-02", "03-A-03", "04-A-04", "09-A-09", "10-A-10", "11-A-11", "12-A-12")


def register_crop_per_well(tmp_path: Path, store, wells, experiment_name: str, **registration) -> list:
    """Register one directory per well holding its DNA channel (Channel2) cropped to ``CROP``.

    ``registration``: further arguments of ``register_image_directory`` (``segmentation_defaults``...).
    """
    from mantle_assets.registration import register_image_directory

    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found")
    entities = []
    for well in wells:
        directory = tmp_path / well
        directory.mkdir()
        pixels = tifffile.imread(images / f"Channel2-{well}.tif")
        tifffile.imwrite(directory / f"{well}.tif", np.ascontiguousarray(pixels[CROP]))
        entities.append(register_image_directory(store, directory, experiment_name, **registration))
    return entities


@pytest.fixture(autouse=True)
def mantle_home(tmp_path, monkeypatch) -> Path:
    """A fresh $MANTLE_HOME and $DAGSTER_HOME for every test: nothing lands in the working tree."""
    home = tmp_path / "mantle home"
    monkeypatch.setenv("MANTLE_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    (home / "dagster").mkdir(parents=True)
    return home


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test, to fill with :func:`fill_disk`: a real full disk.

    Mounting needs root (CI runs as root); the test is skipped only where the mount fails.
    """
    disk = tmp_path / "small disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(disk)],
                                 capture_output=True, text=True, timeout=60)
    except OSError as error:
        pytest.skip(f"cannot mount a tmpfs to fill: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True, timeout=60)


def fill_disk(disk: Path, leave: int = 0) -> Path:
    """Write one file on ``disk`` until at most ``leave`` bytes are free; delete the file to free them."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while (stats := os.statvfs(disk)).f_bavail * stats.f_frsize > leave:
                file.write(b"\1" * 4096)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    return filler


@pytest.fixture
def instance(mantle_home):
    """A real Dagster instance in the test's DAGSTER_HOME."""
    with DagsterInstance.local_temp(str(mantle_home / "dagster")) as local:
        yield local


@pytest.fixture
def bbbc014_crops(tmp_path) -> Path:
    """Two BBBC014 wells cropped to 160x160, both channels, named as on the plate."""
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found (set MANTLE_DEMO_DATA)")
    directory = tmp_path / "plate crops"
    directory.mkdir()
    for well in TWO_WELLS:
        for channel in (1, 2):
            pixels = tifffile.imread(images / f"Channel{channel}-{well}.tif")
            tifffile.imwrite(directory / f"Channel{channel}-{well}.tif", np.ascontiguousarray(pixels[CROP]))
    return directory


@pytest.fixture
def bundled_model_name() -> str:
    from mantle_assets.models.registry import bundled_specs

    specs = [s for s in bundled_specs() if s.offline]
    if not specs:
        pytest.fail("no bundled model in the package")
    return specs[0].name


@dataclass
class S3:
    """A bucket on a local S3 server, and a boto3 client to arrange and inspect it independently of Mantle."""

    client: Any
    bucket: str

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def put_directory(self, local: Path, prefix: str) -> str:
        """Upload a folder's files under ``prefix``; return the prefix's URI."""
        for path in sorted(local.iterdir()):
            self.client.put_object(Bucket=self.bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
        return self.uri(prefix)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()


@pytest.fixture
def s3(tmp_path, monkeypatch) -> S3:
    """Bucket ``lab`` on a real S3 server (moto's, on a free local port), reached through s3fs.

    Mantle finds it the way a deployment would: fsspec's ``FSSPEC_S3_ENDPOINT_URL``
    and the usual AWS variables, here with fake credentials and no AWS files of the machine.
    """
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mantle-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "mantle-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no aws config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no aws credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="lab")
    try:
        yield S3(client, "lab")
    finally:
        # moto keeps its buckets in the process, not the server: empty them for the next test.
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
        server.stop()
