"""Live rows to other machines: Tiled's stream (a tiled.client watcher, a browser) vs 0MQ.

    python benchmarks/streaming.py [--side 64] [--no-browser] [--no-zmq] [--no-restart]

A simulated fly scan at 1 kHz (``side x side`` points, 1 ms per point, frames in HDF5 by the
ophyd-async detector) is analysed live, and the latency from each frame's own time (the
detector's timestamp, carried by its derived row) to the row's arrival is measured, as median
and 99th percentile, for:

- Tiled: the RunEngine process analyses with ``NanobeamCallback`` and stores raw and derived runs
  through ``SpooledTiledWriter`` in a ``nanobeam serve`` process with streaming (in-memory store);
  the rows arrive at a ``DerivedRunWatcher`` (what ``nanobeam watch`` runs, through tiled.client's
  streaming API) and at the live-maps page in headless Chromium;
- 0MQ: the RunEngine publishes to a ``bluesky-0MQ-proxy``, ``nanobeam listen`` (another
  process) analyses and publishes the derived run back, a SUB socket receives it.

Then the Tiled scan again with the server stopped for 3 s a third of the way in: how many of the
rows reach the watcher and the page (goal: all). Goal: 99th percentile < 1 s.

Each line also gives the rate the frames were taken at, by their own times: the simulated
detector is Python in the RunEngine's process, so on 2 cores shared with the analysis, the
writers, the server and Chromium it falls below 1 kHz (a real detector does not).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

PERIOD_S = 0.001
EXPOSURE_S = 0.0005
#: Frames' worth of derived rows per TiledWriter write (s).
DERIVED_BATCH_S = 0.1


def _rate(frame_times: list[float]) -> float:
    """Frames per second by the frames' own times."""
    t = np.sort(np.asarray(frame_times))
    return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan")


def _percentiles(latencies_s: list[float]) -> str:
    if not latencies_s:
        return "no rows"
    ms = np.asarray(latencies_s) * 1e3
    return f"median {np.median(ms):7.0f} ms   p99 {np.percentile(ms, 99):7.0f} ms"


class _Scan:
    """A 1 kHz fly scan over a phantom: the devices and its path."""

    def __init__(self, side: int, directory: Path) -> None:
        from ophyd_async.core import init_devices

        from nanobeam_bluesky.devices import FrameSimulator, NanoprobeFlyDetector, NanoprobeStage, RasterPath
        from nanobeam_bluesky.phantoms import fig3_phantom

        sample = fig3_phantom(side, pixel_size_um=0.1)
        self.n = side * side
        last = (side - 1) * 0.1
        self.path = RasterPath.grid(0, last, side, 0, last, side, snake=True)
        simulator = FrameSimulator(sample, seed=1, cache_frames=self.n)
        simulator.prepare(self.path.x_um, self.path.y_um)  # then each frame is a Poisson draw
        with init_devices():
            self.stage = NanoprobeStage(name="stage")
            self.detector = NanoprobeFlyDetector(simulator, self.stage, directory=directory, name="flydet")

    def plan(self) -> Any:
        from nanobeam_bluesky.devices import fly_raster_scan

        return fly_raster_scan(
            self.detector,
            self.stage,
            self.path,
            exposure_s=EXPOSURE_S,
            dead_time_s=PERIOD_S - EXPOSURE_S,
            flush_period_s=0.05,
        )


class _Watcher(threading.Thread):
    """A DerivedRunWatcher in a thread: the arrival time of each row it gets from the stream."""

    def __init__(self, uri: str, api_key: str) -> None:
        super().__init__(daemon=True)
        from nanobeam_bluesky.tiled.watch import DerivedRunWatcher

        self.watcher = DerivedRunWatcher(uri, api_key=api_key, follow=True, poll_s=0.5)
        self.latency_s: dict[int, float] = {}
        self.rows: dict[str, set[int]] = {}  # derived uid -> raw seq_nums received (any way)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.watcher.events():
                rows = event.new_rows
                if rows is None or event.run is None:
                    continue
                now = time.time()
                seqs = np.asarray(rows["raw_seq_num"]).astype(int).tolist()
                self.rows.setdefault(event.run.uid, set()).update(seqs)
                if event.via == "stream":
                    for seq, t in zip(seqs, np.asarray(rows["time"], dtype=float).tolist(), strict=True):
                        self.latency_s.setdefault(seq, now - t)
        except BaseException as exc:
            self.error = exc

    def received(self, uid: str | None) -> int:
        return len(self.rows.get(uid or "", ()))

    def close(self) -> None:
        self.watcher.close()
        self.join(10)


def _browser(url: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.get(url)
    return driver


def _page_rows(driver: Any) -> tuple[int, list[float], list[float]]:
    """(cells filled in the page, latency (s) of each row the page got from the stream, and of its
    write: frame time -> the server's timestamp of the append that carried it)."""
    arrivals = driver.execute_script("return window.nanobeamView.arrivals()") or []
    filled = int(driver.execute_script("return window.nanobeamView.filledCells()") or 0)
    seen: dict[int, tuple[float, float]] = {}
    for seq, frame_time, written_ms, arrived_ms in arrivals:
        if frame_time is not None:
            t = float(frame_time)
            seen.setdefault(int(seq), (arrived_ms / 1e3 - t, written_ms / 1e3 - t))
    return filled, [a for a, _ in seen.values()], [w for _, w in seen.values()]


def _wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _tiled_scan(
    label: str,
    predictor: Any,
    side: int,
    detector_dir: Path,
    server: Any,
    stores: tuple[Any, Any],
    watcher: _Watcher,
    driver: Any,
    outage: bool,
) -> list[str]:
    from bluesky import RunEngine

    from nanobeam_bluesky.callbacks import NanobeamCallback, mark_raw_runs

    raw_store, derived_store = stores
    RE = RunEngine({})
    mark_raw_runs(RE)
    scan = _Scan(side, detector_dir)
    callback = NanobeamCallback(predictor)
    callback.flush()  # its warm-up done, as in a session where it was made before the scan
    callback.subscribe(derived_store)
    RE.subscribe(raw_store)
    RE.subscribe(callback)
    derived_uids: list[str] = []
    callback.subscribe(lambda name, doc: derived_uids.append(doc["uid"]), "start")
    emitted: list[float] = []  # frame time -> the derived row handed to the subscribers
    frame_times: list[float] = []

    def on_page(name: str, doc: dict[str, Any]) -> None:
        now = time.time()
        frame_times.extend(np.asarray(doc["time"], dtype=float).tolist())
        emitted.extend(now - np.asarray(doc["time"], dtype=float))

    callback.subscribe(on_page, "event_page")
    watcher.latency_s.clear()

    def stop_and_restart() -> None:
        time.sleep(scan.n * PERIOD_S / 3)
        server.stop()
        time.sleep(3.0)
        server.start()

    restarter = threading.Thread(target=stop_and_restart, daemon=True)
    if outage:
        restarter.start()
    RE(scan.plan())
    callback.flush()
    if outage:
        restarter.join()
    raw_store.flush(timeout=120)
    derived_store.flush(timeout=120)
    callback.close()
    uid = derived_uids[0] if derived_uids else None
    _wait(lambda: watcher.received(uid) >= scan.n, 60)
    lines = [
        f"{label:38s} (analysed, to subscribers  {_percentiles(emitted)})",
        f"{'':38s} watcher  rows {watcher.received(uid):5d}/{scan.n}  "
        f"{_percentiles(list(watcher.latency_s.values()))}   (frames at {_rate(frame_times):.0f}/s)",
    ]
    if driver is not None:
        _wait(lambda: _page_rows(driver)[0] >= scan.n, 60)
        filled, page_latencies, write_latencies = _page_rows(driver)
        lines.append(f"{'':38s} browser  cells {filled:5d}/{scan.n}  {_percentiles(page_latencies)}")
        lines.append(f"{'':38s} (stored  by the server   {_percentiles(write_latencies)})")
        driver.refresh()  # the next scan's run afresh (the page follows the newest run)
    return lines


def tiled_path(predictor: Any, side: int, work: Path, browser: bool, restart: bool) -> list[str]:
    from nanobeam_bluesky.tiled.catalog import writer_batch_size
    from nanobeam_bluesky.tiled.server import ServerConfig, TiledServer, free_port
    from nanobeam_bluesky.tiled.spool import SpooledTiledWriter

    lines = []
    detector_dir = work / "detector"
    detector_dir.mkdir(parents=True, exist_ok=True)
    config = ServerConfig(data_dir=work / "tiled", readable=(detector_dir,), port=free_port())
    server = TiledServer(config).start()
    try:
        # TiledWriter writes when a batch is full: the derived rows every DERIVED_BATCH_S of
        # frames (what the maps show), the raw run's file references every second (fewer writes).
        rate = 1 / PERIOD_S
        raw_batch = writer_batch_size(frame_rate_hz=rate, latency_s=1.0)
        derived_batch = writer_batch_size(frame_rate_hz=rate, latency_s=DERIVED_BATCH_S)
        raw_store = SpooledTiledWriter(server.client("runs"), work / "spool-runs", batch_size=raw_batch)
        derived_store = SpooledTiledWriter(
            server.client("derived"), work / "spool-derived", batch_size=derived_batch
        )
        watcher = _Watcher(config.url, server.api_key)
        watcher.start()
        driver = _browser(f"{config.live_url}#key={server.api_key}") if browser else None
        for label, outage in (("Tiled", False), ("Tiled, server stopped 3 s mid-scan", True)):
            if outage and not restart:
                continue
            lines += _tiled_scan(
                label,
                predictor,
                side,
                detector_dir,
                server,
                (raw_store, derived_store),
                watcher,
                driver,
                outage,
            )
        watcher.close()
        if driver is not None:
            driver.quit()
        raw_store.close()
        derived_store.close()
    finally:
        server.stop()
    return lines


def zmq_path(model: str | None, side: int, work: Path) -> list[str]:
    import socket

    import zmq
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    in_address, out_address = (f"tcp://127.0.0.1:{p}" for p in ports)
    exe = shutil.which("bluesky-0MQ-proxy", path=str(Path(sys.executable).parent)) or "bluesky-0MQ-proxy"
    proxy = subprocess.Popen([exe, "--in-address", in_address, "--out-address", out_address])
    command = [
        sys.executable,
        "-m",
        "nanobeam_bluesky.cli",
        "listen",
        "--from",
        out_address,
        "--to",
        in_address,
    ]
    if model:
        command += ["--model", model]
    listener = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.connect(out_address)
    sub.setsockopt(zmq.SUBSCRIBE, b"nanobeam ")
    try:
        while "ready" not in (listener.stdout.readline() if listener.stdout else "ready"):
            if listener.poll() is not None:
                raise RuntimeError("nanobeam listen exited before it was ready")
        detector_dir = work / "detector-zmq"
        detector_dir.mkdir(parents=True, exist_ok=True)
        RE = RunEngine({})
        RE.subscribe(Publisher(in_address.removeprefix("tcp://")))
        scan = _Scan(side, detector_dir)
        latency_s: dict[int, float] = {}
        frame_times: dict[int, float] = {}

        def receive(stop: threading.Event) -> None:
            while not stop.is_set():
                if sub.poll(100):
                    _, name, payload = sub.recv().split(b" ", 2)
                    now = time.time()
                    if name == b"event_page":
                        page = pickle.loads(payload)
                        for seq, t in zip(page["data"]["raw_seq_num"], page["time"], strict=True):
                            latency_s.setdefault(int(seq), now - float(t))
                            frame_times[int(seq)] = float(t)

        time.sleep(1.0)  # 0MQ slow joiners: every link up before the scan
        stop = threading.Event()
        receiver = threading.Thread(target=receive, args=(stop,), daemon=True)
        receiver.start()
        RE(scan.plan())
        _wait(lambda: len(latency_s) >= scan.n, 60)
        stop.set()
        receiver.join()
        return [
            f"{'0MQ (nanobeam listen)':38s} SUB      rows {len(latency_s):5d}/{scan.n}  "
            f"{_percentiles(list(latency_s.values()))}"
        ]
    finally:
        sub.close(linger=0)
        context.term()
        for process in (listener, proxy):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=64, help="raster side: side**2 frames at 1 kHz")
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--no-browser", action="store_true", help="skip the page in headless Chromium")
    parser.add_argument("--no-zmq", action="store_true", help="skip the 0MQ path")
    parser.add_argument("--no-restart", action="store_true", help="skip the server-restart scan")
    args = parser.parse_args()
    from nanobeam_bluesky.inference import Predictor, load_pretrained

    predictor = Predictor.from_file(args.model) if args.model else load_pretrained()
    os.environ.setdefault("MPLBACKEND", "Agg")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{args.side**2} frames at {1 / PERIOD_S:.0f} Hz; latency = row arrival - the frame's own time")
        lines = tiled_path(predictor, args.side, work, not args.no_browser, not args.no_restart)
        if not args.no_zmq:
            lines += zmq_path(args.model, args.side, work)
        print("\n".join(lines))


if __name__ == "__main__":
    main()
