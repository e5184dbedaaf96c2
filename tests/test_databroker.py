"""databroker as the user's door: its v1 ``Broker`` and v2 catalogs on ``nanobeam serve``.

One ``nanobeam serve`` process (loopback, API key) serves the module. A real RunEngine runs a
4 x 4 step scan (our ophyd detector: frames in events) and a 4 x 4 fly scan (our ophyd-async
detector: HDF5 + StreamResource/StreamDatum); bluesky-tiled-plugins' TiledWriter stores them in
``/runs`` and the live ``NanobeamCallback`` writes their analyses to ``/derived``. Every document
emitted, raw and derived, is checked against the event-model schema. README "databroker" shows
what is tested here; what databroker cannot do with these runs is pinned here with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip(
    "databroker", reason="databroker is the extra .[databroker]: pip install -e '.[databroker]'"
)

from nanobeam_bluesky.tiled.catalog import derived_catalog, open_catalog, tiled_writer
from nanobeam_bluesky.tiled.server import ServerConfig, TiledServer, free_port

WORKTREE = Path(__file__).resolve().parents[1]
N = 4  # points per raster line: 16-point scans
FRAME = (64, 64)
#: TiledWriter names both axes of a square frame after their (equal) size, and xarray warns when
#: such an array is read into a Dataset (db[...].table() of a step scan does): upstream, harmless.
DUPLICATE_DIMS = "ignore:Duplicate dimension names:UserWarning"


def _validated(collected: list[tuple[str, dict]]):
    from event_model import DocumentNames, schema_validators

    def check(name: str, doc: dict) -> None:
        schema_validators[DocumentNames[name]].validate(doc)
        collected.append((name, doc))

    return check


@pytest.fixture(scope="module", autouse=True)
def _run_clients_restored():
    """databroker's v1 ``Header`` calls ``run.v2``, which sets the class of every run client in
    the process (see test_a_header_switches_every_run_client_to_the_v2_layout); put tiled's
    default (v3 for SQL-backed runs) back for the modules that run after this one."""
    yield
    from bluesky_tiled_plugins.clients.bluesky_run import BlueskyRun
    from tiled.client.container import DEFAULT_STRUCTURE_CLIENT_DISPATCH

    for dispatch in DEFAULT_STRUCTURE_CLIENT_DISPATCH.values():
        dispatch.set("BlueskyRun", lambda: BlueskyRun)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("databroker")
    detector = root / "detector"  # where the fly-scan detector writes its HDF5 file
    detector.mkdir()
    config = ServerConfig(data_dir=root / "tiled", readable=(detector,), port=free_port())
    srv = TiledServer(config, env={"PYTHONPATH": str(WORKTREE)})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def runs(server):
    return open_catalog(server.config.runs_url, api_key=server.api_key)


@pytest.fixture(scope="module")
def scans(server, runs, model):
    """A step scan then a fly scan, both analysed live; what the RunEngine emitted, kept."""
    import bluesky.plans as bp
    from bluesky import RunEngine
    from ophyd_async.core import init_devices

    from nanobeam_bluesky import mark_raw_runs
    from nanobeam_bluesky.callbacks import NanobeamCallback
    from nanobeam_bluesky.devices import (
        FrameSimulator,
        NanoprobeFlyDetector,
        NanoprobeStage,
        NanoprobeStepDetector,
        RasterPath,
        fly_raster_scan,
    )
    from nanobeam_bluesky.phantoms import fig3_phantom

    directory = server.config.readable[0]
    sample = fig3_phantom(N, pixel_size_um=0.1)
    RE = RunEngine({})  # before the ophyd-async devices: they connect in its event loop
    with init_devices():
        stage = NanoprobeStage()
        flydet = NanoprobeFlyDetector(FrameSimulator(sample, seed=1), stage, directory=directory)
    det = NanoprobeStepDetector(FrameSimulator(sample, seed=2), stage, name="det")

    raw: list[tuple[str, dict]] = []
    derived: list[tuple[str, dict]] = []
    mark_raw_runs(RE)
    RE.subscribe(tiled_writer(runs))
    RE.subscribe(_validated(raw))
    live = NanobeamCallback(model.predictor)
    live.subscribe(tiled_writer(derived_catalog(runs)))
    live.subscribe(_validated(derived))
    RE.subscribe(live)
    (step,) = RE(bp.grid_scan([det], stage.y, 0, 0.3, N, stage.x, 0, 0.3, N), sample="SIO-db")
    path = RasterPath.grid(0, 0.3, N, 0, 0.3, N, snake=True)
    (fly,) = RE(fly_raster_scan(flydet, stage, path, exposure_s=0.005, dead_time_s=0.001), sample="SIO-db")
    assert live.flush(timeout=120)
    live.close()
    events = [doc for name, doc in raw if name == "event"]
    (h5file,) = directory.glob("*.h5")
    return {
        "step": step,
        "fly": fly,
        "step_scan_id": runs[step].start["scan_id"],
        "events": events,
        "h5file": h5file,
        "derived_starts": [doc for name, doc in derived if name == "start"],
    }


def _fly_file(path: Path) -> dict[str, np.ndarray]:
    from nanobeam_bluesky.devices._fly_detector import DATA_PATH, X_PATH, Y_PATH

    with h5py.File(path, "r", swmr=True) as h5:
        return {"frames": h5[DATA_PATH][()], "x": h5[X_PATH][()], "y": h5[Y_PATH][()]}


# ---------------------------------------------------------------------------------- the door
def test_broker_named_and_from_profile_find_the_server_by_profile(server, scans, tmp_path):
    """As a user: a profile file in the directory that $TILED_PROFILES names (read when tiled is
    imported: a fresh process), the API key in $TILED_API_KEY (profiles hold no keys)."""
    (tmp_path / "beamline.yml").write_text(f"nanobeam-beamline:\n  uri: {server.config.runs_url}\n")
    script = (
        "import json\n"
        "from databroker import Broker, from_profile\n"
        "db = Broker.named('nanobeam-beamline')\n"
        "runs = from_profile('nanobeam-beamline')\n"
        f"table = db[{scans['step_scan_id']}].table(fields=['stage-x', 'stage-y'])\n"
        "print(json.dumps({'last': db[-1].start['uid'], 'n': len(runs), 'cls': type(runs).__name__,\n"
        "    'columns': sorted(table.columns), 'rows': len(table), 'in_v2': db[-1].start['uid'] in runs}))\n"
    )
    env = {**os.environ, "TILED_PROFILES": str(tmp_path), "TILED_API_KEY": server.api_key}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "last": scans["fly"],  # the scan, not its analysis (in /derived)
        "n": 2,
        "cls": "CatalogOfBlueskyRuns",
        "columns": ["stage-x", "stage-y", "time"],
        "rows": N * N,
        "in_v2": True,
    }


def test_db_minus_one_and_scan_id_mean_the_scans(runs, scans):
    from databroker import Broker

    db = Broker(runs)
    assert len(scans["derived_starts"]) == 2  # both scans were analysed while they ran ...
    assert db[-1].start["uid"] == scans["fly"]  # ... yet the newest run is the last scan
    assert db[-2].start["uid"] == scans["step"]
    assert db[scans["step_scan_id"]].start["uid"] == scans["step"]
    assert {h.start["uid"] for h in db(analysis_stage="raw")} == {scans["step"], scans["fly"]}
    assert {h.start["uid"] for h in db(sample="SIO-db")} == {scans["step"], scans["fly"]}
    begun = db[scans["fly"]].start["time"]
    assert [h.start["uid"] for h in db(since=begun - 1e-3, until=begun + 60)] == [scans["fly"]]


@pytest.mark.filterwarnings(DUPLICATE_DIMS)
def test_table_of_a_step_scan_is_its_events(runs, scans):
    from databroker import Broker

    events = scans["events"]
    table = Broker(runs)[scans["step"]].table()
    assert set(table.columns) == {"det_image", "det_total_counts", "stage-x", "stage-y", "time"}
    assert list(table.index) == [e["seq_num"] for e in events] == list(range(1, N * N + 1))
    for key in ("stage-x", "stage-y", "det_total_counts"):
        np.testing.assert_array_equal(table[key].to_numpy(), [e["data"][key] for e in events])
    frames = np.stack(table["det_image"].to_list())
    assert frames.shape == (N * N, *FRAME) and frames.dtype == np.uint32
    np.testing.assert_array_equal(frames, [e["data"]["det_image"] for e in events])
    # times to the microsecond (pandas datetime64 of the events' float seconds)
    times = table["time"].to_numpy().astype("datetime64[us]").astype(np.int64) / 1e6
    np.testing.assert_allclose(times, [e["time"] for e in events], atol=2e-6, rtol=0)


def test_derived_runs_found_from_the_raw_run_by_parent_uid(runs, scans):
    from databroker import Broker

    from nanobeam_bluesky.callbacks import ANALYSIS_STAGE

    raw = Broker(runs)[scans["step"]]
    derived_db = Broker(derived_catalog(runs))
    (analysis,) = derived_db(parent_uid=raw.start["uid"])
    start = analysis.start
    assert start["parent_scan_id"] == raw.start["scan_id"] and start["scan_id"] == 0
    assert start["analysis_stage"] == ANALYSIS_STAGE and start["sample"] == "SIO-db"
    assert {h.start["parent_uid"] for h in derived_db(analysis_stage=ANALYSIS_STAGE)} == {
        scans["step"],
        scans["fly"],
    }
    table = analysis.table()
    assert {"strain", "omega", "chi", "flag", "raw_seq_num", "stage-x", "stage-y"} <= set(table.columns)
    np.testing.assert_array_equal(np.sort(table["raw_seq_num"].to_numpy()), np.arange(1, N * N + 1))
    order = np.argsort(table["raw_seq_num"].to_numpy())
    raw_positions = raw.table(fields=["stage-x", "stage-y"])
    for key in ("stage-x", "stage-y"):
        np.testing.assert_array_equal(table[key].to_numpy()[order], raw_positions[key].to_numpy())
    assert np.isfinite(table["strain"]).all()


# ---------------------------------------------------------------------------------- fly scans
def test_fly_scan_table_holds_only_time_unless_filled(runs, scans):
    """databroker v1's table() leaves out every data key a descriptor marks ``external`` unless
    ``fill=True``; ophyd-async marks all of a StreamResource stream's keys so (``STREAM:``),
    positions included, since the detector writes them into its HDF5 file too."""
    from databroker import Broker

    header = Broker(runs)[scans["fly"]]
    (descriptor,) = header.descriptors
    assert {key: dk.get("external") for key, dk in descriptor["data_keys"].items()} == dict.fromkeys(
        descriptor["data_keys"], "STREAM:"
    )
    empty = header.table()
    assert list(empty.columns) == ["time"] and len(empty) == 0
    with pytest.raises(ValueError, match="fill=True"):
        header.table(fields=["flydet-x"])
    assert list(header.events()) == []  # the frames' rows are StreamDatum, not events
    with pytest.raises(NotImplementedError):
        list(header.documents(fill=True))  # databroker 2: only the stored documents

    truth = _fly_file(scans["h5file"])
    table = header.table(fill=True)
    assert {"flydet", "flydet-x", "flydet-y"} <= set(table.columns) and len(table) == N * N
    np.testing.assert_array_equal(table["flydet-x"].to_numpy(), truth["x"])
    np.testing.assert_array_equal(table["flydet-y"].to_numpy(), truth["y"])
    # Each frame comes as (1, 64, 64) until the run is validated: ophyd-async's StreamResource
    # says multiplier 1, and bluesky-tiled-plugins makes that a leading axis of the datum.
    frames = np.stack(table["flydet"].to_list()).reshape(N * N, *FRAME)
    np.testing.assert_array_equal(frames, truth["frames"])


def test_fly_scan_through_the_tiled_client(runs, scans):
    """The tiled client reads the HDF5-backed keys as arrays: ``db.v3[uid]`` (the catalog's own
    layout, ``run["primary"][key]``) or a header's ``.v2`` (databroker v2's layout,
    ``run["primary"]["data"][key]``)."""
    from databroker import Broker

    truth = _fly_file(scans["h5file"])
    db = Broker(runs)
    v3 = db.v3[scans["fly"]]["primary"]
    v2 = db[scans["fly"]].v2["primary"]["data"]
    for stream in (v3, v2):
        np.testing.assert_array_equal(stream["flydet-x"].read(), truth["x"])
        np.testing.assert_array_equal(stream["flydet-y"].read(), truth["y"])
        assert stream["flydet"].shape[0] == N * N
        np.testing.assert_array_equal(np.asarray(stream["flydet"][5]).reshape(FRAME), truth["frames"][5])
    dataset = v3.read(variables=["flydet-x", "flydet-y"])  # an xarray Dataset, without the frames
    np.testing.assert_array_equal(dataset["flydet-x"].to_numpy(), truth["x"])


def test_a_header_switches_every_run_client_to_the_v2_layout(runs, scans):
    """Upstream, pinned (README "databroker" says it): databroker's ``Header`` calls ``run.v2``,
    which copies the client's structure-client map and sets ``BlueskyRun`` to the v2 class; the
    copy shares tiled's process-wide default map, so after ``db[uid]`` every tiled client in the
    process returns v2-layout runs. ``.v3`` / ``.v2`` on a run or catalog always give that layout."""
    from databroker import Broker
    from tiled.client import from_uri

    uid = scans["fly"]
    assert type(runs.v3[uid]).__name__ == "BlueskyRunV3"
    assert "flydet-x" in runs[uid]["primary"]
    Broker(runs)[uid]
    fresh = from_uri(runs.uri, api_key=runs.context.api_key)  # a new client, same process
    assert type(fresh[uid]).__name__ == "BlueskyRunV2SQL"
    assert set(fresh[uid]["primary"]) >= {"data", "timestamps"}
    assert "flydet-x" in fresh[uid].v3["primary"]
