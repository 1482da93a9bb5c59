"""Locations on object storage: URIs, listing fingerprints, local copies, uploads.

fsspec's in-memory file system stands in for a store where any will do; what
depends on S3 itself (ETags, s3fs, endpoint configuration) runs against a real
local S3 server (the ``s3`` fixture).
"""

import uuid

import fsspec
import numpy as np
import pytest
import tifffile

from mantle_assets.imaging.fields import ImageDirectoryError, group_fields
from mantle_assets.storage import (
    is_directory,
    is_uri,
    local_copy,
    normalised_uri,
    remote_fingerprint,
    remote_image_files,
    remove,
    upload_directory,
)


@pytest.fixture
def memory_plate():
    """``memory://<unique>/plate`` with two image objects, a hidden one, a non-image and a hidden sub-folder."""
    fs = fsspec.filesystem("memory")
    root = f"/mantle-test-{uuid.uuid4().hex}"
    fs.pipe({
        f"{root}/plate/Channel1-01-A-01.tif": tiff_bytes(1),
        f"{root}/plate/Channel2-01-A-01.tif": tiff_bytes(2),
        f"{root}/plate/._Channel1-01-A-01.tif": b"resource fork",
        f"{root}/plate/notes.txt": b"not an image",
        f"{root}/plate/.thumbnails/Channel1-01-A-01.tif": tiff_bytes(3),
    })
    yield f"memory://{root}/plate"
    fs.rm(root, recursive=True)


def tiff_bytes(value: int, shape=(8, 8)) -> bytes:
    fs = fsspec.filesystem("memory")
    scratch = f"/scratch-{uuid.uuid4().hex}.tif"
    with fs.open(scratch, "wb") as out:
        tifffile.imwrite(out, np.full(shape, value, np.uint8))
    data = fs.cat(scratch)
    fs.rm(scratch)
    return data


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("s3://lab/plate1", True),
        ("gs://bucket", True),
        ("az://container/prefix/", True),
        ("memory://x", True),
        ("S3://lab/plate1", True),
        ("file:///data/plate1", False),
        ("/data/plate1", False),
        ("plate1", False),
        ("C:\\data\\plate1", False),
        ("/data/odd:name", False),
    ],
)
def test_uris_are_told_from_paths(location, expected):
    assert is_uri(location) is expected


def test_uris_are_normalised():
    assert normalised_uri("S3://lab/plate1//") == "s3://lab/plate1"
    with pytest.raises(ValueError, match="not a URI"):
        normalised_uri("/data/plate1")


def test_listing_keeps_visible_images(memory_plate):
    names = [entry["relative"] for entry in remote_image_files(memory_plate)]
    assert names == ["Channel1-01-A-01.tif", "Channel2-01-A-01.tif"]


def test_a_plate_in_sub_folders_is_listed_and_copied_with_its_folders(tmp_path):
    fs = fsspec.filesystem("memory")
    root = f"/mantle-test-{uuid.uuid4().hex}/plate"
    fs.pipe({f"{root}/TimePoint_1/P_A01_s1_w{c}.tif": tiff_bytes(c) for c in (1, 2)})
    try:
        uri = f"memory://{root}"
        assert [entry["relative"] for entry in remote_image_files(uri)] == [
            "TimePoint_1/P_A01_s1_w1.tif", "TimePoint_1/P_A01_s1_w2.tif"
        ]
        with local_copy(uri, tmp_path / "staging") as local:
            grouping = group_fields(local)
            assert (grouping.scheme, grouping.timepoint, grouping.wells) == ("metaxpress", "TimePoint_1", ["A01"])
    finally:
        fs.rm(root, recursive=True)


def test_fingerprint_changes_when_an_object_is_rewritten_or_added(memory_plate):
    fs, path = fsspec.core.url_to_fs(memory_plate)
    count, before = remote_fingerprint(memory_plate)
    assert count == 2
    assert remote_fingerprint(memory_plate) == (2, before)
    fs.pipe(f"{path}/notes.txt", b"other notes")
    fs.pipe(f"{path}/.thumbnails/new.tif", tiff_bytes(4))
    assert remote_fingerprint(memory_plate) == (2, before)  # neither an image nor in a visible folder

    fs.pipe(f"{path}/Channel1-01-A-01.tif", tiff_bytes(9))
    rewritten = remote_fingerprint(memory_plate)
    assert rewritten[0] == 2 and rewritten[1] != before
    fs.pipe(f"{path}/Channel1-02-A-02.tif", tiff_bytes(1))
    added = remote_fingerprint(memory_plate)
    assert added[0] == 3 and added[1] not in (before, rewritten[1])


def test_s3_fingerprint_sees_a_same_size_rewrite_through_the_etag(s3):
    s3.client.put_object(Bucket=s3.bucket, Key="plate/a.tif", Body=b"0" * 64)
    count, before = remote_fingerprint(s3.uri("plate"))
    assert count == 1
    s3.client.put_object(Bucket=s3.bucket, Key="plate/a.tif", Body=b"1" * 64)
    assert remote_fingerprint(s3.uri("plate")) != (1, before)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("memory://mantle-test-nothing/here", "image directory memory://mantle-test-nothing/here does not exist"),
        ("nosuchscheme://lab/plate", "image directory nosuchscheme://lab/plate: Protocol not known: nosuchscheme"),
    ],
)
def test_unlistable_uris_are_named_in_one_line(uri, message):
    with pytest.raises(ImageDirectoryError) as raised:
        remote_fingerprint(uri)
    assert str(raised.value) == message
    assert not is_directory(uri)


def test_an_object_is_not_a_directory(memory_plate):
    with pytest.raises(ImageDirectoryError, match=r"^memory://\S+/Channel1-01-A-01\.tif is not a directory$"):
        remote_image_files(f"{memory_plate}/Channel1-01-A-01.tif")
    assert is_directory(memory_plate)


def test_a_local_directory_is_its_own_copy(tmp_path):
    with local_copy(tmp_path, tmp_path / "staging") as local:
        assert local == tmp_path
    assert not (tmp_path / "staging").exists()


def test_a_copy_holds_the_images_and_is_removed_afterwards(memory_plate, tmp_path):
    staging = tmp_path / "staging"
    with local_copy(memory_plate, staging, "run-1-") as local:
        assert local.name == "plate" and local.parent.name.startswith("run-1-")
        assert sorted(p.name for p in local.iterdir()) == ["Channel1-01-A-01.tif", "Channel2-01-A-01.tif"]
        grouping = group_fields(local)
        assert (grouping.scheme, grouping.n_channels) == ("bbbc014", 2)
    assert list(staging.iterdir()) == []


def test_a_failing_block_removes_the_copy_and_its_errors_name_the_uri(memory_plate, tmp_path):
    fs, path = fsspec.core.url_to_fs(memory_plate)
    fs.pipe(f"{path}/Channel2-01-A-01.tif", b"truncated")
    staging = tmp_path / "staging"
    with pytest.raises(ImageDirectoryError) as raised:
        with local_copy(memory_plate, staging) as local:
            group_fields(local)
    message = str(raised.value)
    assert message.startswith(f"cannot read image {memory_plate}/Channel2-01-A-01.tif: not a TIFF file")
    assert str(tmp_path) not in message
    assert list(staging.iterdir()) == []


def test_upload_then_remove(tmp_path, s3):
    local = tmp_path / "masks"
    (local / "nested").mkdir(parents=True)
    (local / "a_cp_masks.tif").write_bytes(b"a")
    (local / "nested" / "b.tif").write_bytes(b"b")
    upload_directory(local, s3.uri("masks/E000001/run-1"))
    assert s3.keys() == ["masks/E000001/run-1/a_cp_masks.tif", "masks/E000001/run-1/nested/b.tif"]
    assert s3.read("masks/E000001/run-1/a_cp_masks.tif") == b"a"
    remove(s3.uri("masks/E000001/run-1"))
    assert s3.keys() == []
    remove(s3.uri("masks/E000001/run-1"))  # nothing there: not an error
