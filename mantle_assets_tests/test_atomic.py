import pytest

from mantle_assets.atomic import atomic_directory


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


def test_never_overwrites_an_existing_output(tmp_path):
    final = tmp_path / "run-1"
    final.mkdir()
    with pytest.raises(FileExistsError, match="run-1"):
        with atomic_directory(final):
            pass
