"""Tiled outages cost nothing: scans complete, and every document reaches Tiled exactly once.

A real ``nanobeam serve`` process per test module is stopped during scans and started again on
the same port and catalog. Timings never decide pass or fail: the assertions are on what was
stored.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from nanobeam_bluesky.physics import simulate, to_counts
from nanobeam_bluesky.tiled.server import ServerConfig, TiledServer, free_port
from nanobeam_bluesky.tiled.spool import SpooledTiledWriter

WORKTREE = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("outage")
    detector = root / "detector"
    detector.mkdir()
    srv = TiledServer(
        ServerConfig(data_dir=root / "tiled", readable=(detector,), port=free_port()),
        env={"PYTHONPATH": str(WORKTREE)},
    )
    srv.start()
    srv.detector_dir = detector
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def quick_retries(monkeypatch):
    """Tiled's client retries a failing request for 45 s; 2 s here, so that a writer gives up
    during the outage and the spool's rewrite is what stores the run."""
    import tiled.client.utils

    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 2.0)


def _step_detector(x):
    import ophyd.sim

    rng = np.random.default_rng(1)

    class FrameSignal(ophyd.sim.SynSignal):
        def describe(self):
            description = super().describe()
            description[self.name]["dtype_numpy"] = "<u2"
            return description

    def frame():
        return to_counts(simulate(0.001 * x.position, 0.01 * x.position, 0.0), 7.0, scale=1.0, rng=rng)[
            0
        ].astype(np.uint16)

    return FrameSignal(func=frame, name="image", labels={"detectors"})


def _outage_at(server: TiledServer, seq_num: int, down: list[float]):
    """A subscriber that stops the server when raw event ``seq_num`` arrives."""

    def probe(name, doc):
        if name == "event" and doc["seq_num"] == seq_num:
            server.stop()
            down.append(time.monotonic())

    return probe


# TiledWriter's first write fails while Tiled is down; event-model's RunRouter says so (expected).
@pytest.mark.filterwarnings("ignore:The callback .* raised:UserWarning")
@pytest.mark.parametrize("outage", ["short", "until after the scan"])
def test_step_scan_through_a_tiled_outage_loses_nothing(server, tmp_path, model, outage, quick_retries):
    import bluesky.plans as bp
    import ophyd.sim
    from bluesky import RunEngine

    from nanobeam_bluesky.callbacks import NanobeamCallback
    from nanobeam_bluesky.tiled.catalog import derived_runs

    runs = server.client("runs")
    writer = SpooledTiledWriter(runs, tmp_path / "spool", probe_interval_s=0.2)
    # The derived run goes the same way, to its own catalog through its own spool.
    derived_writer = SpooledTiledWriter(
        server.client("derived"), tmp_path / "spool-derived", probe_interval_s=0.2
    )
    callback = NanobeamCallback(model.predictor)
    callback.subscribe(derived_writer)
    frames: list[np.ndarray] = []
    RE = RunEngine({})
    RE.subscribe(writer)
    RE.subscribe(callback)
    RE.subscribe(lambda name, doc: name == "event" and frames.append(np.asarray(doc["data"]["image"])))
    down: list[float] = []
    RE.subscribe(_outage_at(server, 4, down))
    x = ophyd.sim.SynAxis(name="x")
    restarted = False

    def restart_mid_scan(name, doc):
        nonlocal restarted
        if outage == "short" and name == "event" and doc["seq_num"] == 12 and not restarted:
            server.start()
            restarted = True

    RE.subscribe(restart_mid_scan)
    (uid,) = RE(bp.scan([_step_detector(x)], x, -1, 1, 16))
    assert down and len(frames) == 16  # the scan ran to its end through the outage
    assert callback.flush(timeout=60)
    if not server.alive():
        server.start()
    assert writer.flush(timeout=120), writer.status()
    assert derived_writer.flush(timeout=120), derived_writer.status()
    if outage != "short":  # a writer gave up during the outage: the spool wrote its run again
        assert any(s["rewrites"] >= 1 for s in writer.status().values()), writer.status()
    assert writer.close() and derived_writer.close()
    runs = server.client("runs")
    stored = runs[uid]
    assert stored.metadata["stop"]["exit_status"] == "success"
    np.testing.assert_array_equal(stored["primary"]["image"].read(), np.stack(frames))  # once each
    (derived,) = derived_runs(runs, uid)  # found in /derived, beside /runs
    stored_derived = server.client("derived")[derived]
    rows = stored_derived["primary"]["raw_seq_num"].read()
    np.testing.assert_array_equal(np.sort(rows), np.arange(1, 17))
    assert stored_derived.metadata["stop"] is not None
    for spool in ("spool", "spool-derived"):  # spool files go once stored
        assert not list((tmp_path / spool).glob("*.msgpack"))
    callback.close()


@pytest.mark.filterwarnings("ignore:The callback .* raised:UserWarning")
def test_fly_scan_is_not_stalled_by_a_dead_tiled(server, tmp_path, phantom, quick_retries):
    from bluesky import RunEngine
    from ophyd_async.core import init_devices

    from nanobeam_bluesky.devices import (
        FrameSimulator,
        NanoprobeFlyDetector,
        NanoprobeStage,
        RasterPath,
        fly_raster_scan,
    )

    n = 4
    RE = RunEngine({})
    with init_devices():
        stage = NanoprobeStage()
        detector = NanoprobeFlyDetector(
            FrameSimulator(phantom(n, 0.1), seed=3), stage, directory=server.detector_dir
        )
    writer = SpooledTiledWriter(server.client("runs"), tmp_path / "spool", probe_interval_s=0.2)
    RE.subscribe(writer)
    down: list[float] = []

    def kill_at_first_datum(name, doc):
        if name == "stream_datum" and not down:
            server.stop()
            down.append(time.monotonic())

    RE.subscribe(kill_at_first_datum)
    path = RasterPath.grid(0, 0.3, n, 0, 0.3, n, snake=True)
    (uid,) = RE(
        fly_raster_scan(detector, stage, path, exposure_s=0.005, dead_time_s=0.001, flush_period_s=0.05)
    )
    assert down  # Tiled was down for most of the scan, which completed
    server.start()
    assert writer.flush(timeout=120), writer.status()
    runs = server.client("runs")
    assert runs[uid].metadata["stop"]["exit_status"] == "success"
    assert runs[uid]["primary"]["detector"].shape[0] == n * n
    writer.close()


@pytest.mark.filterwarnings("ignore:The callback .* raised:UserWarning")
def test_a_spool_left_by_a_dead_process_is_written_by_the_next_writer(server, tmp_path, quick_retries):
    from event_model import compose_run

    spool = tmp_path / "spool"
    server.stop()
    uri = server.url + "/api/v1/metadata/runs"
    first = SpooledTiledWriter(uri, spool, api_key=server.api_key, probe_interval_s=0.2)
    bundle = compose_run(metadata={"sample": "spooled while Tiled was down"})
    first("start", bundle.start_doc)
    keys = {"x": {"source": "x", "dtype": "number", "shape": []}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    first("descriptor", desc.descriptor_doc)
    for i in range(5):
        first("event", desc.compose_event(data={"x": float(i)}, timestamps={"x": 0.0}, seq_num=i + 1))
    first("stop", bundle.compose_stop())
    assert not first.close(timeout=1)  # Tiled is down: nothing could be written, all is spooled
    server.start()
    second = SpooledTiledWriter(server.client("runs"), spool, probe_interval_s=0.2)  # a new session
    assert second.flush(timeout=120), second.status()
    run = server.client("runs")[bundle.start_doc["uid"]]
    np.testing.assert_array_equal(run["primary"]["x"].read(), np.arange(5.0))
    assert run.metadata["start"]["sample"] == "spooled while Tiled was down"
    second.close()
