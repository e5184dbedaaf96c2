"""TiledWriter batching: how fast a step scan with 64 x 64 frames is stored, and when rows show.

Starts ``nanobeam serve`` (loopback) in a temporary directory, runs the same RunEngine grid scan
with no writer and with TiledWriter at several batch sizes, and prints per batch size: wall time,
events/s, and the delay between the first row's last event and the first row end at which a
second client can read that row (so about one row time is the best possible).

    python benchmarks/tiled_writer.py [--rows 10] [--cols 20] [--tables sqlite|duckdb]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nanobeam_bluesky.physics import simulate, to_counts
from nanobeam_bluesky.tiled.catalog import open_catalog, tiled_writer
from nanobeam_bluesky.tiled.server import ServerConfig, TiledServer, free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--cols", type=int, default=20)
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 0, 100, 10000], help="batch sizes; 0 means one scan row"
    )
    parser.add_argument("--tables", choices=["sqlite", "duckdb"], default="sqlite")
    args = parser.parse_args()

    import bluesky.plans as bp
    import ophyd.sim
    from bluesky import RunEngine

    workdir = Path(tempfile.mkdtemp(prefix="nanobeam-bench-"))
    tables = None if args.tables == "sqlite" else f"duckdb:///{workdir / 'tiled' / 'data' / 'tables.duckdb'}"
    config = ServerConfig(data_dir=workdir / "tiled", lazy_library=False, port=free_port(), tables_uri=tables)
    frame = to_counts(simulate(0.001, 0.01, 0.02), 7.0, scale=1.0, rng=0)[0].astype(np.uint16)

    class FrameSignal(ophyd.sim.SynSignal):
        def describe(self):
            description = super().describe()
            description[self.name]["dtype_numpy"] = "<u2"
            return description

    x, y = ophyd.sim.SynAxis(name="x"), ophyd.sim.SynAxis(name="y")
    detector = FrameSignal(func=lambda: frame, name="nanobeam_image")
    n = args.rows * args.cols
    plan_args = ([detector], y, 0, 1, args.rows, x, 0, 1, args.cols)
    try:
        with TiledServer(config) as server:
            runs = open_catalog(server.url, api_key=server.api_key)
            reader = open_catalog(server.url, api_key=server.api_key)
            RE = RunEngine({})
            start = time.perf_counter()
            RE(bp.grid_scan(*plan_args))
            bare = time.perf_counter() - start
            print(f"{args.rows} x {args.cols} grid scan, 64 x 64 uint16 frames, tables in {args.tables}")
            print(f"{'batch':>8} {'wall s':>8} {'events/s':>9} {'row 1 visible after':>20}")
            print(f"{'no writer':>8} {bare:8.2f} {n / bare:9.0f} {'-':>20}")
            for batch in args.batches:
                size = batch or args.cols
                writer = tiled_writer(runs, batch_size=size)
                visible: dict[str, float] = {}
                state: dict[str, object] = {}

                def mark(name, doc, state=state):
                    # Subscribed before the writer: the moment the first row's last event exists.
                    if name == "start":
                        state["uid"] = doc["uid"]
                    elif name == "event" and doc["seq_num"] == args.cols:
                        state["row_done"] = time.perf_counter()

                def probe(name, doc, state=state, visible=visible):
                    # Subscribed after the writer: at each row's end, can a second client read the
                    # first row yet? (Checked once per row so the probe does not slow the scan.)
                    if (
                        name == "event"
                        and doc["seq_num"] % args.cols == 0
                        and "row_done" in state
                        and "seen" not in visible
                    ):
                        stream = reader[state["uid"]]["primary"]
                        if "nanobeam_image" in stream and stream["nanobeam_image"].shape[0] >= args.cols:
                            visible["seen"] = time.perf_counter() - state["row_done"]
                    elif name == "stop" and "seen" not in visible:
                        visible["seen"] = time.perf_counter() - state["row_done"]

                tokens = [RE.subscribe(mark), RE.subscribe(writer), RE.subscribe(probe)]
                start = time.perf_counter()
                RE(bp.grid_scan(*plan_args))
                wall = time.perf_counter() - start
                for token in tokens:
                    RE.unsubscribe(token)
                label = f"{size}" + (" (row)" if batch == 0 else "")
                print(f"{label:>8} {wall:8.2f} {n / wall:9.0f} {visible['seen']:19.2f}s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(ophyd.sim.img.save_path, ignore_errors=True)


if __name__ == "__main__":
    main()
