"""Numeric precision of the Cellpose network's passes.

On CPUs with AMX (Intel Sapphire Rapids and later) the network runs about four
times faster in bfloat16 with channels-last tensors than in float32; Cellpose
itself always computes in float32. Mixed precision keeps the weights, the
losses and everything outside the network in float32.
"""

from __future__ import annotations

import functools

PRECISIONS = ("auto", "float32", "bfloat16")


def check_precision(precision: str) -> None:
    """Raise a one-line ``ValueError`` naming the parameter for an unknown precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def fast_bfloat16_available(device_type: str) -> bool:
    """Whether bfloat16 is a measured speed-up on this device: CPUs with AMX-BF16 only."""
    import torch

    return device_type == "cpu" and torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported()


def resolve_precision(precision: str, device_type: str) -> str:
    """``"auto"`` becomes ``"bfloat16"`` where :func:`fast_bfloat16_available`, else ``"float32"``."""
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bfloat16" if fast_bfloat16_available(device_type) else "float32"


def _as_float32(output):
    if isinstance(output, (list, tuple)):
        return type(output)(_as_float32(item) for item in output)
    return output.float()


def run_network_in(net, precision: str) -> str:
    """Make a Cellpose ``CPnet`` compute in ``precision`` from now on; returns the precision used.

    In bfloat16 the network's forward pass runs under autocast on
    channels-last tensors and returns float32 tensors, so Cellpose's
    inference (``model.eval``), ``train_seg`` and ``train_size`` use it
    unchanged, and gradients reach the float32 weights. Cellpose's own MKLDNN
    conversion is switched off for it: MKLDNN tensors do not autocast.

    Parameters
    ----------
    net : cellpose.resnet_torch.CPnet
        The network, modified in place.
    precision : {"auto", "float32", "bfloat16"}

    Returns
    -------
    str
        ``"float32"`` or ``"bfloat16"``.
    """
    import torch

    device_type = next(net.parameters()).device.type
    resolved = resolve_precision(precision, device_type)
    if resolved == "float32":
        return resolved
    net.mkldnn = False
    net.to(memory_format=torch.channels_last)
    float32_forward = net.forward

    @functools.wraps(float32_forward)
    def bfloat16_forward(data):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            outputs = float32_forward(data.contiguous(memory_format=torch.channels_last))
        return _as_float32(outputs)

    net.forward = bfloat16_forward
    return resolved
