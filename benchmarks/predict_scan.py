"""`nanobeam predict` on a large scan file against `predict()` on frames already in memory.

    python benchmarks/predict_scan.py [--frames 8192] [--chunk 1024] [--threads 2]

Writes an areaDetector-style HDF5 file of raw 128 x 128 ROIs (uint16, one frame per chunk;
512 simulated frames repeated), then in one process, warm (model loaded, physics check built):

1. ``predict()`` on the same frames in memory, chunk by chunk: the raw speed;
2. the file read chunk by chunk, then predicted, one after the other (no overlap);
3. ``predict_scan`` (what ``nanobeam predict`` runs): reading on a second thread overlapping the
   model.

Prints frames/s and the ratio to 1 (goal: 3 at >= 50 % of 1), and the process's peak memory
(bounded by the chunks, not the scan's length: try --frames 100000). ``--cold`` drops the page
cache before passes 2 and 3, so that the file is read from disk, as a scan written hours ago is.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from nanobeam_bluesky.departures import random_parameters
from nanobeam_bluesky.inference import load_pretrained
from nanobeam_bluesky.physics import simulate_roi
from nanobeam_bluesky.scans import open_scan, predict_scan


def _write_scan(path: Path, n: int, instrument) -> None:
    rng = np.random.default_rng(0)
    params = random_parameters(instrument, 512, rng)
    # Raw ROI counts: 7 counts at the Laue maximum once binned 2 x 2 (a quarter per raw pixel).
    base = rng.poisson(7.0 / 4 * simulate_roi(*params.T, instrument)).astype(np.uint16)
    side = int(np.ceil(np.sqrt(n)))
    with h5py.File(path, "w") as h5:
        frames = h5.create_dataset("/entry/data/data", (n, 128, 128), np.uint16, chunks=(1, 128, 128))
        for i in range(0, n, 512):
            j = min(i + 512, n)
            frames[i:j] = base[: j - i]
        rows, cols = np.divmod(np.arange(n), side)
        nd = h5.create_group("/entry/instrument/NDAttributes")
        nd.create_dataset("SampleX", data=0.05 * cols).attrs["units"] = "um"
        nd.create_dataset("SampleY", data=0.05 * rows).attrs["units"] = "um"


def _drop_caches(cold: bool) -> None:
    """The file read from disk, not from memory, in the pass that follows (Linux, root)."""
    if cold:
        import os

        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--frames", type=int, default=8192, help="scan points")
    parser.add_argument("--chunk", type=int, default=1024, help="frames per chunk")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each reading pass (needs root), so the file comes from disk",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = load_pretrained()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.h5"
        t0 = time.perf_counter()
        _write_scan(path, args.frames, predictor.instrument)
        print(
            f"wrote {args.frames} raw 128 x 128 frames ({path.stat().st_size / 2**20:.0f} MB) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        source = open_scan(path)
        predictor.predict(source.read(0, 64))  # warm: the physics check built, kernels compiled
        spans = [(i, min(i + args.chunk, args.frames)) for i in range(0, args.frames, args.chunk)]

        in_memory = [source.read(0, min(args.chunk, args.frames))]
        t0 = time.perf_counter()
        for i, j in spans:
            predictor.analyse(in_memory[0][: j - i])
        raw = args.frames / (time.perf_counter() - t0)

        _drop_caches(args.cold)
        t0 = time.perf_counter()
        for i, j in spans:
            predictor.analyse(source.read(i, j))
        sequential = args.frames / (time.perf_counter() - t0)

        _drop_caches(args.cold)
        maps = predict_scan(source, predictor, chunk_frames=args.chunk, progress=False)
        overlapped = maps.frames_per_s
        source.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'predict() on frames in memory':48s} {raw:8,.0f} frames/s   1.00x")
    print(f"{'read, then predict (no overlap)':48s} {sequential:8,.0f} frames/s   {sequential / raw:.2f}x")
    print(
        f"{'predict_scan: reading overlaps the model':48s} {overlapped:8,.0f} frames/s   "
        f"{overlapped / raw:.2f}x (goal >= 0.50x)"
    )
    print(f"maps {dict(maps.dataset.sizes)}; peak memory of the process {peak_mb:,.0f} MB")


if __name__ == "__main__":
    main()
