"""The Cellpose network's achieved GFLOP/s against this machine's measured matmul peak.

Counts the floating-point operations of one forward pass over Cellpose's batch
of eight 224x224 tiles (torch's FlopCounterMode: 2 per multiply-add), times it
in float32 and in bfloat16 (mantle_assets.imaging.precision), and measures the
matmul peak of each precision with large square matrix products. Prints figures
(no assertions). Example:

    python benchmarks/network_throughput.py --model mantle-nuclei-v1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mantle_assets.imaging.precision import run_network_in
from mantle_assets.models.registry import resolve_model

TILE = 224
BATCH = 8


def best_seconds(run, repeats: int) -> float:
    run()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_gflops(dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    return 2 * size**3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def network(weights: str, precision: str):
    from cellpose import models

    net = models.CellposeModel(gpu=False, pretrained_model=weights).net
    net.mkldnn = False  # Cellpose's MKLDNN path cannot be counted by FlopCounterMode; timing is alike
    run_network_in(net, precision)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mantle-nuclei-v1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=4096)
    args = parser.parse_args()
    weights = str(resolve_model(args.model).path)
    tiles = torch.rand(BATCH, 2, TILE, TILE)

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(weights, "float32")(tiles)
    flops = counter.get_total_flops()
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, model {args.model}")
    print(f"forward pass, {BATCH} tiles of {TILE}x{TILE}: {flops / 1e9:.1f} GFLOP ({flops / BATCH / 1e9:.2f} per tile)")
    for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        peak = matmul_peak_gflops(dtype, args.matmul_size, args.repeats)
        net = network(weights, precision)
        with torch.no_grad():
            seconds = best_seconds(lambda net=net: net(tiles), args.repeats)
        achieved = flops / seconds / 1e9
        print(
            f"{precision:9s} matmul peak {peak:7.0f} GFLOP/s | network {seconds:.3f} s per batch, "
            f"{achieved:6.0f} GFLOP/s = {100 * achieved / peak:4.1f} % of peak, {seconds / BATCH * 1e3:.0f} ms per tile"
        )


if __name__ == "__main__":
    main()
