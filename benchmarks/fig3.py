"""The seed's Fig. 3, reproduced and measured: a phantom, its scan, the fits and the network.

    python benchmarks/fig3.py [--size 165] [--library library.h5] [--model MODEL.pt] [--literal]

1. The Fig. 3 phantom (strain domains, tilt steps), its scan simulated at 7 counts (Poisson).
2. Fitted with the published correlation fit (``faithful``; ``--literal`` adds the same method as
   the literal frames x 68,921 correlation product), our likelihood fit (``ours``) and the
   network (``--model``, else the shipped pretrained model; skipped with a message if neither
   exists), one after the other in this process.
3. Printed per method and parameter: RMSE and bias against the truth, the correlation of the strain
   error with the true omega, wall time (library preparation and fit), peak memory (VmHWM of this
   process, reset before each method, and its rise above the resident memory at the start of the
   method), and the network's speed relative to each fit. The Cramer-Rao bound at 7 counts over
   the phantom's pixels is printed for scale.
4. One PNG: truth and every method's maps of strain, omega and chi, one colour scale per parameter.

The library is simulated in memory (same forward model and sampling as ``nanobeam simulate-library``)
unless ``--library`` names a file; each method builds its own matrices from it, and that time is
reported as "prep".
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from nanobeam_bluesky.evaluation import map_errors
from nanobeam_bluesky.fitting import PARAMETERS, CorrelationFitter, Library, LikelihoodFitter
from nanobeam_bluesky.phantoms import fig3_phantom, simulate_scan
from nanobeam_bluesky.physics import Instrument, crlb
from nanobeam_bluesky.plotting import save_map_comparison

UNITS = {"strain": "", "omega": " deg", "chi": " deg"}


# ------------------------------------------------------------------------------ memory
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Reset VmHWM (Linux >= 4.0) so that each method's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """Run fn; return (result, seconds, peak RSS MiB, peak rise above the starting RSS MiB)."""
    _reset_peak()
    start_rss = _status_mib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    return result, seconds, peak, peak - start_rss


# ------------------------------------------------------------------------------ methods
def _library(args: argparse.Namespace, instrument: Instrument) -> Library:
    if args.library:
        return Library.from_file(args.library)
    return Library.from_instrument(instrument, args.grid)


def _fit(make: Callable[[], Any], scan: np.ndarray) -> Callable[[], tuple[xr.Dataset, float, float]]:
    def run() -> tuple[xr.Dataset, float, float]:
        start = time.perf_counter()
        fitter = make()
        prepared = time.perf_counter()
        result = fitter.fit(scan)
        return result, prepared - start, time.perf_counter() - prepared

    return run


def _network(args: argparse.Namespace, scan: np.ndarray, instrument: Instrument):
    from nanobeam_bluesky.inference import Predictor, load_pretrained

    try:
        predictor = Predictor.from_file(args.model) if args.model else load_pretrained()
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"NN: skipped, no model ({exc}). Pass --model PATH to include it.")
        return None
    name = str(getattr(predictor, "path", "pretrained"))
    frames = scan.reshape(-1, *scan.shape[2:])
    predictor.predict(frames[:256], instrument=instrument)  # warm-up (threads, allocator)

    def run() -> tuple[xr.Dataset, float, float]:
        start = time.perf_counter()
        out = predictor.predict(frames, instrument=instrument)
        seconds = time.perf_counter() - start
        dims = ("scan_y", "scan_x")
        ds = xr.Dataset({p: (dims, out[p].values.reshape(scan.shape[:2])) for p in PARAMETERS})
        return ds, 0.0, seconds

    return name, run


# ------------------------------------------------------------------------------ report
def _times(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2g}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", type=int, default=165, help="phantom side in pixels (165 as in the seed)")
    parser.add_argument("--library", default=None, help="library file (default: simulate the 41^3 grid)")
    parser.add_argument("--grid", type=int, default=None, help="points per axis of a simulated library")
    parser.add_argument("--model", default=None, help="network model file (default: the shipped one)")
    parser.add_argument("--max-counts", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--literal",
        action="store_true",
        help="also run the faithful fit as the literal frames x library product (minutes)",
    )
    parser.add_argument("--ours-full-search", action="store_true", help="also run ours with coarse_stride=1")
    parser.add_argument("--crlb-pixels", type=int, default=200, help="phantom pixels for the CRLB (0: skip)")
    parser.add_argument("--scan-cache", default=None, help=".npy to reuse the simulated scan from")
    parser.add_argument("--out", default="nanobeam-output/fig3.png")
    args = parser.parse_args()

    instrument = Instrument()
    phantom = fig3_phantom(args.size, instrument=instrument)
    truth = phantom.to_dataset()
    cache = Path(args.scan_cache) if args.scan_cache else None
    if cache is not None and cache.exists():
        scan = np.load(cache)
        print(f"scan: {scan.shape} from {cache}")
    else:
        start = time.perf_counter()
        scan = simulate_scan(phantom, instrument, args.max_counts, rng=args.seed)
        print(
            f"scan: {scan.shape} simulated in {time.perf_counter() - start:.1f} s "
            f"({scan.shape[0] * scan.shape[1]} frames, {args.max_counts:g} counts at the Laue maximum)"
        )
        if cache is not None:
            np.save(cache, scan)
    n_frames = scan.shape[0] * scan.shape[1]

    runs: dict[str, Callable[[], tuple[xr.Dataset, float, float]]] = {
        "faithful": _fit(lambda: CorrelationFitter(_library(args, instrument)), scan),
    }
    if args.literal:
        runs["faithful (literal product)"] = _fit(
            lambda: CorrelationFitter(_library(args, instrument), strategy="full"), scan
        )
    runs["ours"] = _fit(lambda: LikelihoodFitter(_library(args, instrument)), scan)
    if args.ours_full_search:
        runs["ours (full search)"] = _fit(
            lambda: LikelihoodFitter(_library(args, instrument), coarse_stride=1), scan
        )
    network = _network(args, scan, instrument)
    if network is not None:
        runs["NN"] = network[1]
        print(f"NN: {network[0]}")

    results: dict[str, xr.Dataset] = {}
    timing: dict[str, tuple[float, float, float, float]] = {}
    for name, run in runs.items():
        (result, prep, fit), _, peak, rise = measure(run)
        results[name] = result
        timing[name] = (prep, fit, peak, rise)
        print(
            f"{name}: prep {prep:.1f} s, fit {fit:.1f} s ({n_frames / fit:,.0f} frames/s), "
            f"peak RSS {peak:,.0f} MiB (+{rise:,.0f} MiB)",
            flush=True,
        )

    grid = args.grid or instrument.grid_points
    source = args.library or f"simulated {grid}^3"
    print(f"\nFig. 3 phantom {args.size}x{args.size}, {args.max_counts:g} counts, library {source}")
    if args.crlb_pixels:
        rng = np.random.default_rng(1)
        pick = rng.choice(n_frames, size=min(args.crlb_pixels, n_frames), replace=False)
        params = [a[pick] for a in phantom.parameters()]
        bound = np.sqrt(np.mean(crlb(*params, instrument, max_counts=args.max_counts) ** 2, axis=0))
        print(
            "CRLB (rms over phantom pixels): "
            + ", ".join(f"{p} {b:.3g}{UNITS[p]}" for p, b in zip(PARAMETERS, bound, strict=True))
        )
    header = (
        "| method | RMSE ε | RMSE ω (deg) | RMSE χ (deg) | bias ε | bias ω | bias χ | corr(ε err, ω) "
        "| prep (s) | fit (s) | frames/s | peak RSS (MiB) |"
    )
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, result in results.items():
        m = map_errors(result, truth)
        prep, fit, peak, rise = timing[name]
        print(
            f"| {name} | "
            + " | ".join(f"{m.rmse[p]:.3g}" for p in PARAMETERS)
            + " | "
            + " | ".join(f"{m.bias[p]:+.2g}" for p in PARAMETERS)
            + f" | {m.strain_error_vs_omega:+.2f} | {prep:.1f} | {fit:.1f} | {n_frames / fit:,.0f} "
            f"| {peak:,.0f} (+{rise:,.0f}) |"
        )
        missing = [p for p in PARAMETERS if m.missing[p] > 0]
        if missing:
            print(f"  ({name}: NaN on {', '.join(f'{m.missing[p]:.1%} of {p}' for p in missing)})")
    if "NN" in timing:
        nn = timing["NN"][1]
        print()
        for name, (prep, fit, _, _) in timing.items():
            if name != "NN":
                print(
                    f"NN vs {name}: {_times(fit / nn)} the speed of the fit alone, "
                    f"{_times((prep + fit) / nn)} with library preparation"
                )
    save_map_comparison(
        args.out,
        truth,
        results,
        phantom.pixel_size_um,
        f"Fig. 3 phantom {args.size}×{args.size}: truth and fitted maps (shared colour scale per row)",
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
