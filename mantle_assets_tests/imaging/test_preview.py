import io

import numpy as np
from PIL import Image

from mantle_assets.imaging.preview import OUTLINE_COLOUR, outline_overlay, png_bytes, to_display


def test_display_scaling_clips_to_percentiles():
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    shown = to_display(image, 10, 90)
    assert shown.dtype == np.uint8
    assert shown.min() == 0 and shown.max() == 255
    assert shown[0, 5] == 0 and shown[9, 5] == 255


def test_outlines_trace_each_object_boundary_only():
    masks = np.zeros((20, 20), dtype=np.int32)
    masks[5:10, 5:10] = 1
    rgb = outline_overlay(np.zeros((20, 20)), masks)
    coloured = np.all(rgb == OUTLINE_COLOUR, axis=-1)
    assert coloured[5, 5:10].all() and coloured[9, 5:10].all()
    assert not coloured[7, 7]  # interior stays grey
    assert coloured.sum() == 16  # the 5x5 square's perimeter


def test_png_is_shrunk_to_the_maximum_size():
    data = png_bytes(np.zeros((1000, 500, 3), dtype=np.uint8), max_size=200)
    with Image.open(io.BytesIO(data)) as picture:
        assert picture.format == "PNG"
        assert picture.size == (100, 200)
