"""Tiled outages during scans: bluesky-tiled-plugins' TiledWriter on the RunEngine vs SpooledTiledWriter.

    python benchmarks/outage.py [--outages 5 60 forever] [--scans step fly] [--writers plain spooled]

A real ``nanobeam serve`` process is stopped during a scan and started again after the given
number of seconds ("forever": after the scan has ended). For each scan type, outage and writer it
prints the scan's outcome and duration, and the frames acquired and stored in Tiled once it is
back (the spooled writer is given up to 120 s after the restart to write what it holds; the plain
writer has nothing to write later). Goal: every scan completes and 100 % of its frames end up in
Tiled.

Step scan: 40 points of a 64 x 64 simulated detector, 0.1 s per point, the outage starting at
point 5. Fly scan: a 16 x 16 raster at 10 ms per point (ophyd-async, frames in HDF5), the outage
starting at its first StreamDatum.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from nanobeam_bluesky.physics import simulate, to_counts
from nanobeam_bluesky.tiled.server import ServerConfig, TiledServer, free_port


def _step_detector(x):
    import ophyd.sim

    rng = np.random.default_rng(1)

    class FrameSignal(ophyd.sim.SynSignal):
        def describe(self):
            description = super().describe()
            description[self.name]["dtype_numpy"] = "<u2"
            return description

    def frame():
        time.sleep(0.1)  # the exposure
        return to_counts(simulate(0.001 * x.position, 0.01 * x.position, 0.0), 7.0, scale=1.0, rng=rng)[
            0
        ].astype(np.uint16)

    return FrameSignal(func=frame, name="image", labels={"detectors"})


def run_case(server: TiledServer, scan: str, outage: str, writer_kind: str, spool: Path) -> dict:
    import bluesky.plans as bp
    import ophyd.sim
    from bluesky import RunEngine

    from nanobeam_bluesky.tiled.catalog import tiled_writer
    from nanobeam_bluesky.tiled.spool import SpooledTiledWriter

    runs = server.client("runs")
    writer = (
        SpooledTiledWriter(runs, spool, probe_interval_s=0.5)
        if writer_kind == "spooled"
        else tiled_writer(runs)
    )
    RE = RunEngine({})
    RE.subscribe(writer)
    killed = threading.Event()
    restart_after = None if outage == "forever" else float(outage)

    def kill() -> None:
        """Stop the server from another thread: stopping takes a moment that the RunEngine must
        not spend (the outage, not our test harness, is what is measured)."""
        if killed.is_set():
            return
        killed.set()

        def outage() -> None:
            server.stop()
            if restart_after is not None:
                time.sleep(restart_after)
                server.start()

        threading.Thread(target=outage, daemon=True).start()

    acquired = []
    uid_box: list[str] = []
    RE.subscribe(lambda name, doc: uid_box.append(doc["uid"]) if name == "start" else None)
    t0 = time.monotonic()
    try:
        if scan == "step":
            x = ophyd.sim.SynAxis(name="x")
            RE.subscribe(
                lambda name, doc: (
                    (acquired.append(1), doc["seq_num"] == 5 and kill()) if name == "event" else None
                )
            )
            RE(bp.scan([_step_detector(x)], x, -1, 1, 40))
        else:
            from ophyd_async.core import init_devices

            from nanobeam_bluesky.devices import (
                FrameSimulator,
                NanoprobeFlyDetector,
                NanoprobeStage,
                RasterPath,
                fly_raster_scan,
            )
            from nanobeam_bluesky.phantoms import fig3_phantom

            n = 16
            with init_devices():
                stage = NanoprobeStage()
                detector = NanoprobeFlyDetector(
                    FrameSimulator(fig3_phantom(n), seed=1), stage, directory=server.config.readable[0]
                )

            frame_resources: set[str] = set()

            def on_datum(name, doc):
                if name == "stream_resource" and doc.get("data_key") == "detector":
                    frame_resources.add(doc["uid"])
                if name == "stream_datum":
                    kill()
                    if doc["stream_resource"] in frame_resources:
                        acquired.extend([1] * (doc["indices"]["stop"] - doc["indices"]["start"]))

            RE.subscribe(on_datum)
            path = RasterPath.grid(0, 1.5, n, 0, 1.5, n, snake=True)
            RE(fly_raster_scan(detector, stage, path, exposure_s=0.01, dead_time_s=0.002, flush_period_s=0.2))
        outcome = "completed"
    except Exception as exc:
        outcome = f"failed: {type(exc).__name__}: {str(exc)[:60]}"
    scan_s = time.monotonic() - t0
    # Wait for the outage to end ("forever": it ends now, after the scan).
    while (
        restart_after is not None
        and killed.is_set()
        and not server.alive()
        and time.monotonic() - t0 < scan_s + restart_after + 60
    ):
        time.sleep(0.5)
    if not server.alive():
        server.start()
    rewrites = 0
    if writer_kind == "spooled":
        writer.flush(timeout=120)
        rewrites = sum(s["rewrites"] for s in writer.status().values())
        writer.close(timeout=5)
    stored = 0
    runs = server.client("runs")
    if uid_box and uid_box[0] in runs:
        key = "image" if scan == "step" else "detector"
        primary = runs[uid_box[0]]
        if "primary" in primary and key in primary["primary"]:
            stored = int(primary["primary"][key].shape[0])
    return {
        "outcome": outcome,
        "scan_s": scan_s,
        "acquired": len(acquired),
        "stored": stored,
        "rewrites": rewrites,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--outages", nargs="+", default=["5", "60", "forever"])
    parser.add_argument("--scans", nargs="+", default=["step", "fly"])
    parser.add_argument("--writers", nargs="+", default=["plain", "spooled"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nanobeam-outage-"))
    detector = root / "detector"
    detector.mkdir()
    server = TiledServer(ServerConfig(data_dir=root / "tiled", readable=(detector,), port=free_port()))
    server.start()
    print(
        "| scan | outage | writer | scan outcome | scan time | frames acquired | stored in Tiled "
        "| runs written again |"
    )
    print("|---|---|---|---|---|---|---|---|")
    try:
        for scan in args.scans:
            for outage in args.outages:
                for kind in args.writers:
                    if not server.alive():
                        server.start()
                    r = run_case(server, scan, outage, kind, root / f"spool-{scan}-{outage}-{kind}")
                    share = r["stored"] / r["acquired"] if r["acquired"] else float("nan")
                    print(
                        f"| {scan} | {outage} s | {kind} | {r['outcome']} | {r['scan_s']:.1f} s | "
                        f"{r['acquired']} | {r['stored']} ({share:.0%}) | {r['rewrites']} |",
                        flush=True,
                    )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
