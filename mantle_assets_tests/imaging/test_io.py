import numpy as np
import pytest
import tifffile

from mantle_assets.imaging.io import ImageReadError, read_image, write_label_image


@pytest.mark.parametrize("top_label, dtype", [(65535, np.uint16), (65536, np.uint32)])
def test_label_images_widen_to_uint32_only_when_needed(tmp_path, top_label, dtype):
    labels = np.zeros((4, 4), np.int64)
    labels[1, 1] = top_label
    labels[2, 2] = 7
    write_label_image(tmp_path / "m.tif", labels)
    written = tifffile.imread(tmp_path / "m.tif")
    assert written.dtype == dtype
    assert np.array_equal(written, labels)


@pytest.mark.parametrize("keep_bytes", [0, 100])
def test_empty_or_truncated_file_is_named(tmp_path, keep_bytes):
    broken = tmp_path / "broken.tif"
    tifffile.imwrite(broken, np.arange(4096, dtype=np.uint16).reshape(64, 64))
    broken.write_bytes(broken.read_bytes()[:keep_bytes])
    with pytest.raises(ImageReadError, match="broken.tif"):
        read_image(broken)
