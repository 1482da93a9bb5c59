import numpy as np
import pytest
import tifffile
import torch
from cellpose.metrics import average_precision
from cellpose.resnet_torch import CPnet

from mantle_assets.imaging.precision import resolve_precision, run_network_in
from mantle_assets.imaging.segmentation import CellposeSegmenter, SegmentationSettings
from mantle_assets.models.registry import resolve_model
from mantle_assets_tests.conftest import bbbc014_images, missing_data


def small_network(seed: int) -> CPnet:
    torch.manual_seed(seed)
    return CPnet([2, 8, 16], 3, 3, mkldnn=True)


def test_unknown_precision_names_the_parameter():
    with pytest.raises(ValueError, match="^precision must be one of auto, float32, bfloat16, got 'half'$"):
        resolve_precision("half", "cpu")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_explicit_precision_is_kept_on_any_device(precision):
    assert resolve_precision(precision, "cpu") == precision
    assert resolve_precision(precision, "cuda") == precision


def test_bfloat16_forward_returns_float32_close_to_float32_forward():
    reference, mixed = small_network(0), small_network(0)
    reference.mkldnn = False
    assert run_network_in(mixed, "bfloat16") == "bfloat16"
    images = torch.rand(2, 2, 64, 64)
    with torch.no_grad():
        expected, expected_style = reference(images)[:2]
        flows, style = mixed(images)[:2]
    assert flows.dtype == torch.float32 and style.dtype == torch.float32
    relative = (flows - expected).abs().mean() / expected.abs().mean()
    assert relative < 0.02
    assert not mixed.mkldnn


def test_bfloat16_training_step_updates_float32_weights():
    net = small_network(1)
    run_network_in(net, "bfloat16")
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.rand(2, 2, 64, 64))[0].pow(2).mean()
    loss.backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))


def test_bfloat16_masks_agree_with_float32_on_a_bbbc014_field(bundled_model_name):
    images = bbbc014_images()
    if images is None:
        missing_data("BBBC014 demo plate not found")
    field = tifffile.imread(images / "Channel2-01-A-01.tif")[:256, :256].astype(np.float32)
    weights = resolve_model(bundled_model_name).path
    settings = SegmentationSettings(diameter=13.0)
    masks = {
        precision: CellposeSegmenter(weights, gpu=False, precision=precision).segment(field, settings).masks
        for precision in ("float32", "bfloat16")
    }
    assert masks["float32"].max() > 20
    _, tp, fp, fn = average_precision([masks["float32"]], [masks["bfloat16"]], threshold=[0.5])
    f1 = 2 * tp[0, 0] / (2 * tp[0, 0] + fp[0, 0] + fn[0, 0])
    assert f1 >= 0.99
