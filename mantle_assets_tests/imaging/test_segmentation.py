import math

import numpy as np
import pytest

from mantle_assets.imaging.segmentation import (
    ParameterError,
    check_channels,
    load_size_parameters,
    parse_diameter,
    select_channels,
    with_smaller_batches_on_oom,
)


@pytest.mark.parametrize("text", ["None", "none", " None ", ""])
def test_none_means_automatic_diameter(text):
    assert parse_diameter(text) is None


@pytest.mark.parametrize("text, value", [("12", 12.0), ("7.5", 7.5), (30, 30.0)])
def test_diameter_in_pixels(text, value):
    assert parse_diameter(text) == value


@pytest.mark.parametrize("text", ["-3", "0", "nan", "inf", "big", math.nan])
def test_bad_diameter_names_the_parameter(text):
    with pytest.raises(ParameterError, match="^diameter must be") as error:
        parse_diameter(text)
    assert "\n" not in str(error.value)


def test_channel_beyond_the_images_is_refused():
    with pytest.raises(ParameterError, match="nuclei_channel=3 but the images have 2 channel"):
        check_channels(3, 3, n_channels=2)


@pytest.mark.parametrize("nuclei, cytoplasm", [(4, 0), (0, -1)])
def test_channel_outside_rgb_is_refused(nuclei, cytoplasm):
    with pytest.raises(ParameterError, match="_channel must be 0, 1, 2 or 3"):
        check_channels(nuclei, cytoplasm)


def test_select_channels_follows_mantle_meanings():
    stack = np.stack([np.full((3, 4), 10.0), np.full((3, 4), 20.0), np.full((3, 4), 60.0)])
    assert np.all(select_channels(stack, 0, 0) == 30.0)  # grayscale: mean of channels
    assert np.all(select_channels(stack, 3, 3) == 60.0)  # nuclei-only of blue
    assert np.all(select_channels(stack, 0, 2) == 20.0)  # green without nuclei
    pair = select_channels(stack, 3, 1)  # red cytoplasm, blue nuclei
    assert pair.shape == (2, 3, 4)
    assert np.all(pair[0] == 10.0) and np.all(pair[1] == 60.0)


def gpu_holding(max_batch: int):
    """Evaluation on a GPU that fits at most ``max_batch`` tiles; records the sizes tried."""
    import torch

    tried = []

    def run(batch_size):
        tried.append(batch_size)
        if batch_size > max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch_size

    return run, tried


def test_out_of_memory_retries_with_halved_batches():
    run, tried = gpu_holding(max_batch=2)
    assert with_smaller_batches_on_oom(run, 8) == 2
    assert tried == [8, 4, 2]


def test_out_of_memory_at_batch_one_is_raised():
    import torch

    run, tried = gpu_holding(max_batch=0)
    with pytest.raises(torch.OutOfMemoryError):
        with_smaller_batches_on_oom(run, 4)
    assert tried == [4, 2, 1]


def test_size_model_is_read_without_unpickling_code(bundled_model_name):
    from mantle_assets.models.registry import resolve_model

    size_file = f"{resolve_model(bundled_model_name).path}_size.npy"
    expected = np.load(size_file, allow_pickle=True).item()
    params = load_size_parameters(size_file)
    assert set(params) == set(expected)
    assert all(np.array_equal(params[key], expected[key]) for key in expected)


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran on load",))


def test_doctored_size_model_is_refused(tmp_path, capsys):
    doctored = tmp_path / "model_size.npy"
    np.save(doctored, np.array({"A": RunsCode(), "smean": 0, "ymean": 0, "diam_mean": 17.0}), allow_pickle=True)
    with pytest.raises(ValueError, match=r"model_size.npy: not a Cellpose size model \(refusing to load builtins"):
        load_size_parameters(doctored)
    assert "this ran on load" not in capsys.readouterr().out


def test_plain_array_is_not_a_size_model(tmp_path):
    array = tmp_path / "array_size.npy"
    np.save(array, np.zeros(3))
    with pytest.raises(ValueError, match="array_size.npy: not a Cellpose size model"):
        load_size_parameters(array)
