"""Simulator speed: the fast path against the exact reference, side by side in one run.

    python benchmarks/simulate.py [--frames 64] [--upsample 4 8]

Prints frames/s of both paths on the same random (off-grid) parameters, their ratio, the worst
relative L2 difference per frame, and the time to generate the full 41^3 grid library in memory.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from nanobeam_bluesky.physics import Instrument, grid_axes, iter_grid, simulate, simulate_exact


def _rate(fn, n: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return n / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--upsample", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--no-library", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.frames
    params = (rng.uniform(-0.005, 0.005, n), rng.uniform(-0.05, 0.05, n), rng.uniform(-0.1, 0.1, n))
    print(f"{'upsample':>8} {'exact fr/s':>11} {'fast fr/s':>10} {'speed-up':>9} {'worst rel L2':>13}")
    for s in args.upsample:
        exact_rate, exact = _rate(lambda s=s: simulate_exact(*params, upsample=s), n)
        simulate(*params[:1], 0, 0, upsample=s)  # warm-up
        fast_rate, fast = _rate(lambda s=s: simulate(*params, upsample=s), n)
        diff = np.linalg.norm((fast - exact).reshape(n, -1), axis=1)
        worst = (diff / np.linalg.norm(exact.reshape(n, -1), axis=1)).max()
        print(f"{s:>8} {exact_rate:>11.1f} {fast_rate:>10.1f} {fast_rate / exact_rate:>8.0f}x {worst:>13.2e}")
    if not args.no_library:
        inst = Instrument()
        axes = grid_axes(inst)
        for s in args.upsample:
            start = time.perf_counter()
            for _ in iter_grid(*axes.values(), inst, upsample=s):
                pass
            dt = time.perf_counter() - start
            print(
                f"library 41^3 = 68,921 frames at {s}x{s} sub-pixels: {dt:.1f} s ({68921 / dt:,.0f} frames/s)"
            )


if __name__ == "__main__":
    main()
