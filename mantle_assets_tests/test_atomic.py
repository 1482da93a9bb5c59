import pytest

from mantle_assets.atomic import atomic_directory, output_directory, removed_on_failure, set_aside_on_failure


def test_directory_appears_only_when_complete(tmp_path):
    final = tmp_path / "out" / "run-1"
    with atomic_directory(final) as partial:
        (partial / "a.tif").write_bytes(b"x")
        assert not final.exists()
    assert (final / "a.tif").read_bytes() == b"x"
    assert [p.name for p in final.parent.iterdir()] == ["run-1"]


def test_failure_leaves_nothing_behind(tmp_path):
    final = tmp_path / "out" / "run-1"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as partial:
            (partial / "a.tif").write_bytes(b"x")
            raise RuntimeError("segmentation failed")
    assert not final.parent.exists()


def test_a_costly_output_whose_record_fails_is_set_aside(tmp_path):
    final = tmp_path / "models" / "run-1"
    with atomic_directory(final) as partial:
        (partial / "weights").write_bytes(b"w")
    with pytest.raises(RuntimeError) as error:
        with set_aside_on_failure(final):
            raise RuntimeError("record failed")
    assert not final.exists()
    assert (tmp_path / "models" / "run-1.unrecorded" / "weights").read_bytes() == b"w"
    assert error.value.__notes__ == [f"outputs kept, unrecorded, in {final}.unrecorded"]


def test_never_overwrites_an_existing_output(tmp_path):
    final = tmp_path / "run-1"
    final.mkdir()
    with pytest.raises(FileExistsError, match="run-1"):
        with atomic_directory(final):
            pass


def test_a_local_output_directory_is_atomic(tmp_path):
    final = tmp_path / "masks" / "run-1"
    with output_directory(final, tmp_path / "scratch") as partial:
        assert partial.name == ".partial-run-1"
        (partial / "a.tif").write_bytes(b"x")
    assert (final / "a.tif").read_bytes() == b"x"
    assert not (tmp_path / "scratch").exists()


def test_a_uri_output_directory_is_uploaded_once_complete(tmp_path, s3):
    scratch = tmp_path / "staging" / "run-1-masks"
    with output_directory(s3.uri("masks/E000001/run-1"), scratch) as partial:
        (partial / "a_cp_masks.tif").write_bytes(b"x")
        assert s3.keys() == []  # nothing is visible while the outputs are written
    assert s3.keys() == ["masks/E000001/run-1/a_cp_masks.tif"]
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_failed_uri_output_directory_uploads_nothing(tmp_path, s3):
    with pytest.raises(RuntimeError):
        with output_directory(s3.uri("masks/E000001/run-1"), tmp_path / "staging" / "run-1-masks") as partial:
            (partial / "a_cp_masks.tif").write_bytes(b"x")
            raise RuntimeError("segmentation failed")
    assert s3.keys() == []
    assert not (tmp_path / "staging").exists()


def test_a_failed_record_removes_the_upload(tmp_path, s3):
    final = s3.uri("masks/E000001/run-1")
    s3.client.put_object(Bucket=s3.bucket, Key="masks/E000001/run-0/a_cp_masks.tif", Body=b"an earlier run")
    with output_directory(final, tmp_path / "run-1-masks") as partial:
        (partial / "a_cp_masks.tif").write_bytes(b"x")
    with pytest.raises(RuntimeError):
        with removed_on_failure(final):
            raise RuntimeError("entity store unreachable")
    assert s3.keys() == ["masks/E000001/run-0/a_cp_masks.tif"]  # only this run's prefix went
