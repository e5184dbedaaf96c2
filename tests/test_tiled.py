"""Tiled: adapters, server, TiledWriter storage and queries, against a real server process.

One ``nanobeam serve`` process (loopback, API key) serves the whole module: a 5^3 library file,
a 5^3 library simulated on demand, and a directory of scan files (one good, one corrupt, one
truncated, one in another layout) and of what beamlines write (an areaDetector file, a directory
of TIFF frames with a positions CSV, an MDA file). Every test talks to it over HTTP with the real
tiled client.

The catalogs are SQLite. With ``NANOBEAM_TEST_POSTGRES=user@host:port`` (and ``PGPASSWORD``) the
same tests run on PostgreSQL, as docs/tiled.md deploys it: empty databases ``nanobeam_runs``,
``nanobeam_derived``, ``nanobeam_files`` and ``nanobeam_tables`` owned by that user, and
``${PGPASSWORD}`` in the URIs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest

from nanobeam_bluesky.formats import MdaFile, MdaPositioner, MdaScan, write_mda
from nanobeam_bluesky.phantoms import fig3_phantom
from nanobeam_bluesky.physics import Instrument, bin_roi, grid_axes, simulate, to_counts, write_library
from nanobeam_bluesky.scanfile import ScanFileError, inspect_scan_file, simulate_scan_file
from nanobeam_bluesky.tiled.catalog import (
    derived_catalog,
    derived_runs,
    open_catalog,
    runs_analysed_by,
    runs_between,
    runs_by_sample,
    runs_by_scan_type,
    tiled_writer,
    writer_batch_size,
)
from nanobeam_bluesky.tiled.server import API_KEY_ENV, ServerConfig, TiledServer, free_port

WORKTREE = Path(__file__).resolve().parents[1]
GRID = 5
SCAN_SHAPE = (3, 4)
ROI_CENTER = (120.0, 136.0)
#: areaDetector file: (N, 1, H, W) frames, stage positions as NDAttributes in mm on a 2 x 3 raster.
AD_FRAMES = (6, 1, 160, 160)
AD_CENTER = (76.0, 84.0)
AD_ROWS, AD_COLS = np.divmod(np.arange(6), 3)
#: TIFF frames scan_1.tif ... scan_12.tif (text order would put scan_10 third) on a 3 x 4 raster.
TIFF_FRAMES = (12, 16, 20)
TIFF_ROWS, TIFF_COLS = np.divmod(np.arange(12), 4)


def _positioner(name: str, values: np.ndarray, unit: str) -> MdaPositioner:
    return MdaPositioner(0, name, name, unit, name + ".RBV", name, unit, np.asarray(values, dtype=np.float64))


def _beamline_files(scans: Path) -> dict[str, np.ndarray]:
    """What beamlines write, next to our scan files; returns what was written."""
    import tifffile

    rng = np.random.default_rng(7)
    ad = rng.integers(0, 40, AD_FRAMES, dtype=np.uint16)
    with h5py.File(scans / "areadetector.h5", "w") as h5:
        data = h5.create_dataset("/entry/data/data", data=ad, chunks=(1, *AD_FRAMES[1:]))
        data.attrs["roi_center_px"] = AD_CENTER
        attrs = h5.create_group("/entry/instrument/NDAttributes")
        attrs.create_dataset("SampleX", data=1e-3 * (1.5 + 0.25 * AD_COLS)).attrs["units"] = "mm"
        attrs.create_dataset("SampleY", data=1e-3 * (4.0 + 0.5 * AD_ROWS)).attrs["units"] = "mm"
    tiffs = scans / "tiffs"
    tiffs.mkdir()
    frames = rng.integers(0, 1000, TIFF_FRAMES, dtype=np.uint16)
    for i, frame in enumerate(frames):
        tifffile.imwrite(tiffs / f"scan_{i + 1}.tif", frame)
    (tiffs / "positions.csv").write_text(
        "x_nm,y_nm\n" + "".join(f"{200 * c},{300 * r}\n" for r, c in zip(TIFF_ROWS, TIFF_COLS, strict=True))
    )
    inner = [
        MdaScan(1, 4, 4, [_positioner("26idcnpi:m17", 0.001 * np.arange(4), "mm")], []) for _ in range(3)
    ]
    outer = MdaScan(2, 3, 3, [_positioner("26idcnpi:m18", 0.5 * np.arange(3), "um")], [], inner=inner)
    write_mda(scans / "scan_0042.mda", MdaFile(1.4, 42, 2, (3, 4), outer))
    return {"areadetector": ad, "tiffs": frames}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled")
    write_library(root / "library.h5", Instrument(), grid_points=GRID, progress=False)
    scans = root / "scans"
    scans.mkdir()
    simulate_scan_file(
        scans / "good.h5", fig3_phantom(SCAN_SHAPE), roi_center_px=ROI_CENTER, rng=1, sample="SIO-A"
    )
    (scans / "corrupt.h5").write_bytes(b"this is not an HDF5 file")
    data = (scans / "good.h5").read_bytes()
    (scans / "truncated.h5").write_bytes(data[: len(data) // 2])
    with h5py.File(scans / "other_layout.h5", "w") as h5:  # frames where we do not look
        h5["/scan/frames"] = np.zeros((2, 256, 256), dtype="u2")
    (scans / "notes.txt").write_text("not a scan")
    (root / "outside.h5").write_bytes(data)
    (scans / "link_outside.h5").symlink_to(root / "outside.h5")
    written = _beamline_files(scans)
    detector = root / "detector"  # where the fly-scan detector writes its HDF5 files
    detector.mkdir()
    return {"root": root, "library": root / "library.h5", "scans": scans, "detector": detector, **written}


@pytest.fixture(scope="module")
def server(workspace):
    config = ServerConfig(
        data_dir=workspace["root"] / "tiled",
        library=workspace["library"],
        lazy_grid_points=GRID,
        scans=workspace["scans"],
        readable=(workspace["detector"],),
        port=free_port(),
        **_postgres_uris(),
    )
    srv = TiledServer(config, env={"PYTHONPATH": str(WORKTREE)})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.alive()


def _postgres_uris() -> dict[str, str]:
    where = os.environ.get("NANOBEAM_TEST_POSTGRES")
    if not where:
        return {}
    user, host = where.split("@")
    uri = f"postgresql://{user}:${{PGPASSWORD}}@{host}/nanobeam_"
    return {
        "catalog_uri": uri + "runs",
        "files_catalog_uri": uri + "files",
        "derived_catalog_uri": uri + "derived",
        "tables_uri": uri + "tables",
    }


@pytest.fixture(scope="module")
def root(server):
    return server.client()


@pytest.fixture(scope="module")
def runs(server):
    return open_catalog(server.url, api_key=server.api_key)


@pytest.fixture(scope="module")
def derived(server):
    """The derived-run catalog, /derived beside /runs."""
    return server.client("derived")


# ---------------------------------------------------------------------------------- server
def test_server_serves_declared_trees_on_loopback_with_api_key(server, root):
    assert list(root) == ["runs", "derived", "files", "library", "simulated", "scans"]
    assert server.config.host == "127.0.0.1"
    # Without the key nothing is readable.
    response = httpx.get(f"{server.url}/api/v1/metadata/library")
    assert response.status_code == 401
    # The config refers to the key instead of holding it; the key file is private.
    text = server.config.config_path.read_text()
    assert server.api_key not in text and f"${{{API_KEY_ENV}}}" in text
    mode = stat.S_IMODE((server.config.data_dir / "api_key").stat().st_mode)
    assert mode == 0o600


def test_scan_directory_lists_only_scan_files_inside_it(root):
    listed = list(root["scans"])
    assert "notes.txt" not in listed  # not a scan file
    assert "link_outside.h5" not in listed  # a link leading outside the declared directory
    assert {"good.h5", "corrupt.h5", "truncated.h5", "other_layout.h5"} <= set(listed)
    assert {"areadetector.h5", "tiffs", "scan_0042.mda"} <= set(listed)  # what beamlines write


# ---------------------------------------------------------------------------------- library
def test_library_file_served_read_and_sliced(root, workspace):
    lib = root["library"]
    assert {s.name for s in lib.specs} >= {"nanobeam-library", "xarray_dataset"}
    assert Instrument.from_dict(lib.metadata["instrument"]) == Instrument()
    frames = lib["frames"]
    assert frames.shape == (GRID, GRID, GRID, 64, 64)
    assert frames.dims == ("strain", "omega", "chi", "row", "col")
    with h5py.File(workspace["library"], "r") as h5:
        stored = h5["frames"]
        np.testing.assert_array_equal(frames[1, 2], stored[1, 2])
        np.testing.assert_array_equal(frames[0, :, 3, 10:20, ::2], stored[0, :, 3, 10:20, ::2])
        np.testing.assert_array_equal(frames[4, 4, ::-2, 31], stored[4, 4, :, 31][::-2])
        for name in ("strain", "omega", "chi"):
            np.testing.assert_array_equal(lib[name].read(), h5[name][()])
    axes = lib.read(variables=["strain", "omega", "chi"])
    assert axes["omega"].attrs["units"] == "deg"


def test_lazy_library_chunks_equal_the_simulator(root):
    lazy = root["simulated"]
    assert lazy.metadata["source"] == "simulated on demand"
    frames = lazy["frames"]
    assert frames.shape == (GRID, GRID, GRID, 64, 64)
    axes = grid_axes(Instrument(), GRID)
    # One chunk: a (strain, omega) row of chi frames.
    block = frames.read_block((3, 1, 0, 0, 0))
    expected = simulate(axes["strain"][3], axes["omega"][1], axes["chi"], Instrument())
    np.testing.assert_array_equal(block[0, 0], expected)
    # A scattered selection is simulated frame by frame at the grid values.
    picked = frames[::2, 4, -1]
    expected = simulate(axes["strain"][::2], axes["omega"][4], axes["chi"][-1], Instrument())
    np.testing.assert_array_equal(picked, expected)
    # The lazy library equals the library file written for the same instrument and grid.
    np.testing.assert_array_equal(frames[2, 3], root["library"]["frames"][2, 3])


# ---------------------------------------------------------------------------------- scan files
def test_experimental_scan_file_served_with_coordinates_and_binned_frames(root, workspace):
    scan = root["scans"]["good.h5"]
    md = scan.metadata
    assert md["sample"] == "SIO-A" and md["roi_center_px"] == list(ROI_CENTER)
    assert md["scan_shape"] == list(SCAN_SHAPE) and md["detector_shape"] == [256, 256]
    raw = scan["frames"].read()
    assert raw.shape == (*SCAN_SHAPE, 256, 256) and raw.dtype == np.uint32
    assert scan["frames"].dims == ("scan_y", "scan_x", "det_row", "det_col")
    binned = scan["binned"]
    assert binned.shape == (*SCAN_SHAPE, 64, 64)
    np.testing.assert_array_equal(binned.read(), bin_roi(raw, ROI_CENTER))
    np.testing.assert_array_equal(binned[1, 2:, 5:9], bin_roi(raw, ROI_CENTER)[1, 2:, 5:9])
    # All counts sit inside the ROI; the binned level matches the library convention (7 counts).
    assert raw.sum() == binned.read().sum()
    assert 0.5 < binned.read().max(axis=(-1, -2)).mean() / 7.0 < 3.0
    ds = scan.read(variables=["binned", "x_um", "y_um"])
    np.testing.assert_allclose(ds["x_um"].values[0], np.arange(SCAN_SHAPE[1]) * 0.05)
    assert ds["x_um"].attrs["units"] == "um"


def test_corrupt_scan_files_give_clear_errors_and_the_server_keeps_running(server, root):
    from tiled.client.utils import ClientError

    scans = root["scans"]
    listing = dict(scans.items())
    assert "corrupt or truncated" in listing["corrupt.h5"].metadata["error"]
    for name in ("corrupt.h5", "truncated.h5"):
        with pytest.raises(ClientError, match="corrupt or truncated") as info:
            scans[name]
        assert info.value.response.status_code == 422
        assert name in str(info.value)
    with pytest.raises(ClientError, match="/entry/data/data"):  # names the missing dataset
        scans["other_layout.h5"]
    assert server.alive()
    assert scans["good.h5"]["binned"][0, 0].shape == (64, 64)


# ---------------------------------------------------------------------------------- beamline formats
def test_areadetector_file_served_with_its_positions_and_binned_frames(root, workspace):
    scan = root["scans"]["areadetector.h5"]
    md = scan.metadata
    assert md["kind"] == "areaDetector/NeXus" and md["dataset"] == "/entry/data/data"
    assert md["frames_shape"] == list(AD_FRAMES) and md["scan_shape"] == [6] and md["grid_shape"] == [2, 3]
    assert md["detector_shape"] == [160, 160] and md["roi_center_px"] == list(AD_CENTER)
    assert md["units"] == {"frames": "counts", "x_um": "um", "y_um": "um"}
    written = workspace["areadetector"][:, 0]  # (N, 1, H, W) served as (point, det_row, det_col)
    frames = scan["frames"]
    assert frames.dims == ("point", "det_row", "det_col") and frames.dtype == np.uint16
    np.testing.assert_array_equal(frames.read(), written)
    np.testing.assert_array_equal(frames[4, 10:20, ::-3], written[4, 10:20, ::-3])
    # Positions in µm, as `nanobeam predict` reads them (NDAttributes in mm), with their grid.
    np.testing.assert_allclose(scan["x_um"].read(), 1.5 + 0.25 * AD_COLS)
    np.testing.assert_allclose(scan["y_um"].read(), 4.0 + 0.5 * AD_ROWS)
    np.testing.assert_array_equal(scan["col"].read(), AD_COLS)
    assert scan["x_um"].metadata["attrs"]["units"] == "um"
    binned = scan["binned"]
    assert binned.shape == (6, 64, 64) and binned.dims == ("point", "row", "col")
    np.testing.assert_array_equal(binned.read(), bin_roi(written, AD_CENTER))


def test_tiff_directory_served_in_acquisition_order_with_csv_positions(root, workspace):
    scan = root["scans"]["tiffs"]
    md = scan.metadata
    assert md["kind"] == "TIFF frames" and md["positions"] == "positions.csv" and md["grid_shape"] == [3, 4]
    assert md["scan_shape"] == [12] and md["detector_shape"] == list(TIFF_FRAMES[1:])
    assert "binned" not in scan and "roi_center_px" in md["note"]  # the server was given no ROI centre
    frames = scan["frames"]
    assert (
        frames.metadata["attrs"]["first"] == "scan_1.tif"
        and frames.metadata["attrs"]["last"] == "scan_12.tif"
    )
    written = workspace["tiffs"]  # frame i is scan_{i + 1}.tif: scan_10 is the 10th, not the 3rd
    np.testing.assert_array_equal(frames.read(), written)
    np.testing.assert_array_equal(frames[9], written[9])
    np.testing.assert_array_equal(frames[::-4, 3:5], written[::-4, 3:5])
    np.testing.assert_allclose(scan["x_um"].read(), 0.2 * TIFF_COLS)  # the CSV is in nm
    np.testing.assert_allclose(scan["y_um"].read(), 0.3 * TIFF_ROWS)
    np.testing.assert_array_equal(scan["row"].read(), TIFF_ROWS)


def test_tiff_directory_binned_when_the_server_knows_the_roi_centre(workspace):
    """The same node, built in-process with the server option roi_center_px (no server needed)."""
    from nanobeam_bluesky.tiled.adapters import ScanDirectoryAdapter

    scans = ScanDirectoryAdapter.from_directory(workspace["scans"], roi_center_px=[8, 10], roi=16, binning=2)
    binned = scans["tiffs"]["binned"]
    assert binned.structure().shape == (12, 8, 8)
    np.testing.assert_array_equal(binned.read(), bin_roi(workspace["tiffs"], (8, 10), 16, 2))


def test_mda_file_served_as_its_positions_table(root):
    node = root["scans"]["scan_0042.mda"]
    md = node.metadata
    assert md["kind"] == "APS sscan MDA" and md["scan_number"] == 42 and md["shape"] == [3, 4]
    assert md["complete"] and md["requested_shape"] == [3, 4]
    assert md["positioners"]["x"] == {"name": "26idcnpi:m17", "units": "um", "file_units": "mm"}
    assert md["positioners"]["y"]["name"] == "26idcnpi:m18"
    np.testing.assert_allclose(node["x_um"].read(), np.tile(np.arange(4.0), 3))  # mm -> µm
    np.testing.assert_allclose(node["y_um"].read(), np.repeat(0.5 * np.arange(3), 4))
    np.testing.assert_array_equal(node["row"].read(), np.repeat(np.arange(3), 4))
    assert node["x_um"].metadata["attrs"]["units"] == "um"


def test_scan_file_registered_in_a_catalog_by_mime_type(server, workspace):
    from tiled.client.register import register

    from nanobeam_bluesky.tiled.adapters import ADAPTERS_BY_MIMETYPE, detect_mimetype

    good = workspace["scans"] / "good.h5"
    assert detect_mimetype(good, "application/x-hdf5") == "application/x-nanobeam-scan+hdf5"
    assert detect_mimetype(workspace["library"], None) == "application/x-nanobeam-library+hdf5"
    files = server.client("files")
    asyncio.run(
        register(
            files,
            good,
            prefix="registered",
            adapters_by_mimetype=dict(ADAPTERS_BY_MIMETYPE),
            mimetype_detection_hook="nanobeam_bluesky.tiled.adapters:detect_mimetype",
        )
    )
    node = files["registered"]["good"]
    assert {s.name for s in node.specs} >= {"nanobeam-scan"}
    raw = node["frames"][0, 1]
    np.testing.assert_array_equal(node["binned"][0, 1], bin_roi(raw, ROI_CENTER))
    # A file registered from outside the catalog's declared storage is never read. (tiled
    # refuses it with a 500, which its client retries for ~25 s: ask once, with plain httpx.)
    asyncio.run(
        register(
            files,
            workspace["root"] / "outside.h5",
            prefix="escaped",
            adapters_by_mimetype=dict(ADAPTERS_BY_MIMETYPE),
            mimetype_detection_hook="nanobeam_bluesky.tiled.adapters:detect_mimetype",
        )
    )

    def fetch(path: str) -> httpx.Response:
        return httpx.get(
            f"{server.url}/api/v1/array/full/files/{path}/frames",
            params={"slice": "0,0"},
            headers={"Authorization": f"Apikey {server.api_key}"},
        )

    assert fetch("registered/good").status_code == 200
    assert fetch("escaped/outside").status_code in (403, 500)


# ---------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def ophyd_sim():
    import ophyd.sim

    yield ophyd.sim
    # `import ophyd.sim` leaves an empty temporary directory behind; keep machines clean.
    path = Path(ophyd.sim.img.save_path)
    if path.is_dir() and not any(path.iterdir()):
        shutil.rmtree(path)


def _frame_detector(ophyd_sim, x, y):
    """An image detector: a 64 x 64 Poisson frame that depends on the stage position."""
    rng = np.random.default_rng(5)

    def frame():
        counts = to_counts(simulate(0.002 * x.position, 0.02 * y.position, 0.0), 7.0, scale=1.0, rng=rng)
        return counts[0].astype(np.uint16)

    class FrameSignal(ophyd_sim.SynSignal):
        def describe(self):
            description = super().describe()
            description[self.name]["dtype_numpy"] = "<u2"
            return description

    return FrameSignal(func=frame, name="nanobeam_image", labels={"detectors"})


@pytest.fixture(scope="module")
def raw_run(runs, ophyd_sim):
    import bluesky.plans as bp
    from bluesky import RunEngine

    x, y = ophyd_sim.SynAxis(name="x"), ophyd_sim.SynAxis(name="y")
    frames: list[np.ndarray] = []
    detector = _frame_detector(ophyd_sim, x, y)
    ny, nx = 3, 4
    writer = tiled_writer(runs, batch_size=writer_batch_size(points_per_row=nx))
    seen_during_scan: dict[int, int] = {}

    def probe(name, doc):
        if name == "event":
            frames.append(np.asarray(doc["data"]["nanobeam_image"]))
        # Subscribed after the writer: when event n arrives, rows written so far are readable.
        if name == "event" and doc["seq_num"] in (nx, 2 * nx + 1):
            run = runs[doc_uid["uid"]]
            stream = run["primary"]
            seen_during_scan[doc["seq_num"]] = (
                stream["nanobeam_image"].shape[0] if "nanobeam_image" in stream else 0
            )

    doc_uid = {}
    RE = RunEngine({})
    RE.subscribe(writer)
    RE.subscribe(lambda name, doc: doc_uid.update(uid=doc["uid"]) if name == "start" else None)
    RE.subscribe(probe)
    start = time.time()
    (uid,) = RE(
        bp.grid_scan([detector], y, -1, 1, ny, x, -1, 1, nx),
        sample="SIO-A",
        operator="test",
    )
    return {
        "uid": uid,
        "frames": np.stack(frames),
        "seen": seen_during_scan,
        "start": start,
        "shape": (ny, nx),
        "scan_id": runs[uid].start["scan_id"],
    }


def test_runengine_scan_stored_with_tiledwriter_and_visible_during_the_scan(runs, raw_run):
    run = runs[raw_run["uid"]]
    assert run.metadata["start"]["sample"] == "SIO-A"
    images = run["primary"]["nanobeam_image"].read()
    np.testing.assert_array_equal(images, raw_run["frames"])
    assert images.dtype == np.uint16
    nx = raw_run["shape"][1]
    # Row batching: the first row is in Tiled before the last event of the second row arrives.
    assert raw_run["seen"] == {nx: nx, 2 * nx + 1: 2 * nx}
    names = [name for name, _ in run.documents()]
    assert names[0] == "start" and names[-1] == "stop" and names.count("event") == images.shape[0]


def test_queries_users_type(runs, raw_run):
    from bluesky_tiled_plugins.queries import TimeRange
    from tiled.queries import Key

    uid = raw_run["uid"]
    assert uid in runs_by_sample(runs, "SIO-A")
    assert uid not in runs_by_sample(runs, "another sample")
    assert uid in runs_by_scan_type(runs, "grid_scan")
    assert uid not in runs_by_scan_type(runs, "fly_scan")
    assert uid in runs_between(runs, since=raw_run["start"] - 60)
    assert uid not in runs_between(runs, until=raw_run["start"] - 60)
    # The same queries as typed at the prompt, with tiled's and bluesky-tiled-plugins' objects.
    assert uid in runs.search(Key("sample") == "SIO-A").search(Key("plan_name") == "grid_scan")
    assert uid in runs.search(TimeRange(since="2020-01-01"))


def test_derived_runs_found_by_parent_uid_and_model_sha256(runs, derived, raw_run):
    from event_model import compose_run

    sha = "ab" * 32
    assert derived_catalog(runs).uri == derived.uri == derived_catalog(derived).uri
    writer = tiled_writer(derived_catalog(runs), batch_size=10)
    bundle = compose_run(
        # The keys NanobeamCallback's derived runs carry.
        metadata={
            "parent_uid": raw_run["uid"],
            "analysis_stage": "nanobeam_nn",
            "nanobeam": {"model_sha256": sha},
            "sample": "SIO-A",
        }
    )
    writer("start", bundle.start_doc)
    keys = {
        k: {"source": "nanobeam", "dtype": "number", "shape": [], "dtype_numpy": "<f8"}
        for k in ("strain", "omega", "chi")
    }
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    writer("descriptor", desc.descriptor_doc)
    for i in range(3):
        writer(
            "event",
            desc.compose_event(
                data=dict.fromkeys(keys, 0.1 * i), timestamps=dict.fromkeys(keys, time.time()), seq_num=i + 1
            ),
        )
    writer("stop", bundle.compose_stop())
    derived_uid = bundle.start_doc["uid"]
    found = derived_runs(runs, raw_run["uid"])
    assert list(found) == [derived_uid]
    assert list(runs_analysed_by(runs, sha)) == [derived_uid]
    assert len(runs_analysed_by(runs, "cd" * 32)) == 0
    np.testing.assert_allclose(found[derived_uid]["primary"]["strain"].read(), [0.0, 0.1, 0.2])


def _validated(documents):
    """Check every (name, doc) against event-model's schemas; return them."""
    from event_model import DocumentNames, schema_validators

    for name, doc in documents:
        schema_validators[DocumentNames[name]].validate(doc)
    return documents


def test_runs_minus_one_and_scan_id_mean_the_scan_and_the_analysis_is_in_derived(
    runs, derived, ophyd_sim, model
):
    """A scan analysed live: /runs holds the scan (``runs[-1]``, ``runs[scan_id]``), /derived its
    analysis, linked by parent_uid and parent_scan_id; ``analysis_stage`` picks either kind."""
    import bluesky.plans as bp
    from bluesky import RunEngine
    from tiled.queries import Key

    from nanobeam_bluesky import mark_raw_runs
    from nanobeam_bluesky.callbacks import ANALYSIS_STAGE, RAW_STAGE, NanobeamCallback

    x, y = ophyd_sim.SynAxis(name="x"), ophyd_sim.SynAxis(name="y")
    RE = RunEngine({})
    mark_raw_runs(RE)
    RE.md["scan_id"] = 40  # the RunEngine counts on from here
    raw_docs: list = []
    derived_docs: list = []
    callback = NanobeamCallback(model.predictor)
    callback.subscribe(tiled_writer(derived_catalog(runs), batch_size=12))
    callback.subscribe(lambda name, doc: derived_docs.append((name, doc)))
    RE.subscribe(tiled_writer(runs, batch_size=4))
    RE.subscribe(lambda name, doc: raw_docs.append((name, doc)))
    RE.subscribe(callback)
    (uid,) = RE(bp.grid_scan([_frame_detector(ophyd_sim, x, y)], y, -1, 1, 3, x, -1, 1, 4), sample="SIO-B")
    assert callback.flush(timeout=60)
    callback.close()
    _validated(raw_docs)
    _validated(derived_docs)
    scan_id = raw_docs[0][1]["scan_id"]
    assert scan_id == 41
    assert runs[-1].start["uid"] == uid and runs[scan_id].start["uid"] == uid
    analysis = derived[-1].start
    assert analysis["uid"] == derived_docs[0][1]["uid"]
    assert analysis["parent_uid"] == uid and analysis["parent_scan_id"] == scan_id
    assert analysis["analysis_stage"] == ANALYSIS_STAGE and analysis["uid"] not in runs
    assert list(derived_runs(runs, uid)) == [analysis["uid"]]
    # One key picks raw or derived runs, wherever they are kept.
    stage = Key("start.analysis_stage")
    assert uid in runs.search(stage == RAW_STAGE) and len(runs.search(stage == ANALYSIS_STAGE)) == 0
    assert analysis["uid"] in derived.search(stage == ANALYSIS_STAGE)
    assert len(derived.search(stage == RAW_STAGE)) == 0
    assert len(derived[-1]["primary"]["strain"].read()) == 12
    # Stored in the dtypes the descriptor declares (flag bits as uint16, not int64).
    stored = derived[-1]["primary"]
    for key in ("flag", "raw_seq_num", "strain"):
        declared = np.dtype(stored.metadata["data_keys"][key]["dtype_numpy"])
        assert stored[key].read().dtype == declared, key


def test_catalog_given_by_profile_name(server, runs, raw_run, tmp_path, monkeypatch):
    import tiled.profiles

    (tmp_path / "beamline.yml").write_text(f"nanobeam-test:\n  uri: {server.config.runs_url}\n")
    monkeypatch.setattr(tiled.profiles, "paths", [*tiled.profiles.paths, tmp_path])
    if hasattr(tiled.profiles.load_profiles, "cache_clear"):
        tiled.profiles.load_profiles.cache_clear()
    monkeypatch.setenv("TILED_API_KEY", server.api_key)  # profiles cannot hold keys
    catalog = open_catalog("nanobeam-test")
    assert raw_run["uid"] in catalog
    with pytest.raises(ValueError, match="profile"):
        open_catalog("no-such-profile")


# ---------------------------------------------------------------------------------- replay
def test_replay_stores_a_derived_run_linked_to_its_parent_and_is_reproducible(
    server, runs, derived, raw_run, model
):
    from nanobeam_bluesky.cli import main
    from nanobeam_bluesky.tiled.replay import find_run, replay_run

    uid, n = raw_run["uid"], raw_run["frames"].shape[0]
    writer = tiled_writer(derived, batch_size=8)
    first = replay_run(
        find_run(runs, uid[:8]), model.predictor, subscribers=[writer], page_size=5, source=server.url
    )
    assert first.rows == n and first.stop["exit_status"] == "success"
    stored = derived[first.derived_uid]
    start = stored.metadata["start"]
    assert start["parent_uid"] == uid and start["nanobeam_replay"]["source"] == server.url
    assert start["nanobeam"]["model_sha256"] == model.predictor.sha256
    rows = first.data()
    np.testing.assert_array_equal(rows["raw_seq_num"], np.arange(1, n + 1))
    for key in ("strain", "omega", "chi", "strain_std", "x", "y"):
        np.testing.assert_array_equal(stored["primary"][key].read(), rows[key])
    assert first.derived_uid in derived_runs(runs, uid)
    assert first.derived_uid in runs_analysed_by(runs, model.predictor.sha256)

    # Again, from the command line, by scan_id: a second derived run with identical numbers.
    before = set(derived_runs(runs, uid))
    args = ["replay", server.url, str(raw_run["scan_id"]), "--api-key", server.api_key, "--page-size", "5"]
    assert main(args + (["--model", str(model.path)] if model.path else [])) == 0
    (second,) = set(derived_runs(runs, uid)) - before
    assert second not in runs  # the command line writes to /derived too
    for key in ("strain", "omega", "chi", "strain_std", "omega_std", "chi_std", "fit_quality", "flag"):
        np.testing.assert_array_equal(derived[second]["primary"][key].read(), rows[key])
    assert np.isfinite(rows["fit_quality"]).all()


def test_replay_takes_a_tiled_run_its_v2_client_and_a_v1_header(runs, raw_run, model):
    """The same raw run given as bluesky-tiled-plugins' run, its ``.v2`` client and databroker's
    v1 Header (``catalog.v1[uid]``), frames from Tiled's arrays or from ``documents()``: the same
    derived numbers, one row per raw frame, every document valid. ``Broker(catalog)`` switches the
    session's runs to the v2 classes (``runs[uid]["primary"]`` then hides the frame arrays):
    replay takes them too."""
    from nanobeam_bluesky.tiled.replay import replay_run

    uid, n = raw_run["uid"], raw_run["frames"].shape[0]
    given = {
        "tiled run": lambda: runs[uid],
        "its .v2": lambda: runs[uid].v2,
        "v1 Header": lambda: runs.v1[uid],
        "a run after Broker(catalog)": lambda: runs[uid],
    }
    reference = None
    for label, run in given.items():
        for frames in ("arrays", "documents"):
            result = replay_run(run(), model.predictor, page_size=5, frames=frames)
            _validated(result.documents)
            rows = result.data()
            assert result.raw_uid == uid and result.rows == n, (label, frames)
            assert result.stop["exit_status"] == "success", (label, frames, result.stop)
            np.testing.assert_array_equal(rows["raw_seq_num"], np.arange(1, n + 1))
            assert np.isfinite(rows["strain"]).all() and not rows["flag"].any()
            if reference is None:
                reference = rows
            for key in ("strain", "omega", "chi", "x", "y"):  # same frames, same batches: equal
                np.testing.assert_allclose(rows[key], reference[key], rtol=1e-6, atol=0, err_msg=label)


def test_fly_scan_replayed_from_tiled_arrays_matches_the_live_analysis(runs, model, workspace, phantom):
    from bluesky import RunEngine
    from ophyd_async.core import init_devices

    from nanobeam_bluesky.callbacks import NanobeamCallback
    from nanobeam_bluesky.devices import (
        FrameSimulator,
        NanoprobeFlyDetector,
        NanoprobeStage,
        RasterPath,
        fly_raster_scan,
    )
    from nanobeam_bluesky.tiled.replay import replay_run

    n = 4
    RE = RunEngine({})
    with init_devices():
        stage = NanoprobeStage()
        detector = NanoprobeFlyDetector(
            FrameSimulator(phantom(n, 0.1), seed=3), stage, directory=workspace["detector"]
        )
    live = NanobeamCallback(model.predictor)
    live_docs: list[tuple[str, dict]] = []
    live.subscribe(lambda name, doc: live_docs.append((name, doc)))
    RE.subscribe(tiled_writer(runs, batch_size=8))
    RE.subscribe(live)
    path = RasterPath.grid(0, 0.3, n, 0, 0.3, n, snake=True)
    (uid,) = RE(
        fly_raster_scan(detector, stage, path, exposure_s=0.005, dead_time_s=0.001, flush_period_s=0.1),
        sample="SIO-fly",
    )
    assert live.flush(timeout=60)
    live.close()
    # The stored documents reference the detector file; they carry no frames.
    names = {name for name, _ in runs[uid].documents()}
    assert "stream_datum" in names and "event" not in names
    # The server's validator router checks the registered detector file and fixes its shape.
    assert runs[uid]["primary"]["detector"].shape == (n * n, 1, 64, 64)
    with pytest.warns(UserWarning, match="shape mismatch"):
        assert runs[uid].validate(raise_on_error=True)
    assert runs[uid]["primary"]["detector"].shape == (n * n, 64, 64)

    pages = [doc for name, doc in live_docs if name == "event_page"]
    live_rows = {k: np.concatenate([p["data"][k] for p in pages]) for k in pages[0]["data"]}
    order = np.argsort(live_rows["raw_seq_num"])
    live_times = np.concatenate([p["time"] for p in pages])[order]
    assert np.all(np.diff(live_times) > 0)  # frame times, not one arrival time per page
    # From Tiled's arrays (over HTTP), and from documents() (StreamResource/StreamDatum: the
    # detector file is read here).
    for frames in ("arrays", "documents"):
        replay = replay_run(runs[uid], model.predictor, page_size=16, frames=frames)
        _validated(replay.documents)
        rows = replay.data()
        assert replay.stop["exit_status"] == "success", replay.stop
        np.testing.assert_array_equal(rows["raw_seq_num"], live_rows["raw_seq_num"][order])
        np.testing.assert_allclose(rows["detector-x"], path.x_um)
        for key in ("strain", "omega", "chi"):  # batches differ (live: as frames came), numbers agree
            np.testing.assert_allclose(rows[key], live_rows[key][order], rtol=1e-5, atol=1e-9)
        # Each row's time is its frame's (the detector's frame time), the same live and replayed.
        replay_times = np.concatenate([doc["time"] for name, doc in replay.documents if name == "event_page"])
        np.testing.assert_array_equal(replay_times, live_times)


def test_a_scan_of_another_material_shows_its_flags_in_tiled(runs, derived, ophyd_sim, model):
    """The film seen at 10.8 keV (the model's instrument says 11.3): each frame alone is explained
    almost as well by other parameters, but the run's pooled thickness test is not, and every
    stored row says so, as does the stop document."""
    import bluesky.plans as bp
    from bluesky import RunEngine

    from nanobeam_bluesky.callbacks import NanobeamCallback
    from nanobeam_bluesky.quality import Flag

    other = Instrument(energy_kev=10.8)
    x, y = ophyd_sim.SynAxis(name="x"), ophyd_sim.SynAxis(name="y")
    rng = np.random.default_rng(11)

    def frame():
        expected = 7.0 * simulate(0.001 * x.position, 0.02 * y.position, 0.03, other)
        return rng.poisson(expected)[0].astype(np.uint16)

    class FrameSignal(ophyd_sim.SynSignal):
        def describe(self):
            description = super().describe()
            description[self.name]["dtype_numpy"] = "<u2"
            return description

    detector = FrameSignal(func=frame, name="nanobeam_image", labels={"detectors"})
    callback = NanobeamCallback(model.predictor)
    callback.subscribe(tiled_writer(derived, batch_size=10))
    RE = RunEngine({})
    RE.subscribe(tiled_writer(runs, batch_size=10))
    RE.subscribe(callback)
    (uid,) = RE(bp.grid_scan([detector], y, -1, 1, 4, x, -1, 1, 6), sample="another film")
    assert callback.flush(timeout=60)
    callback.close()
    (derived_uid,) = derived_runs(runs, uid)
    stored = derived[derived_uid]
    flags = stored["primary"]["flag"].read()
    assert len(flags) == 24
    assert np.all(flags & Flag.POOLED_MISMATCH), flags
    stop = stored.metadata["stop"]
    assert "POOLED_MISMATCH" in stop["reason"] and stop["nanobeam"]["pooled_mismatch"] == 1
    # The keys say what the numbers mean.
    keys = stored["primary"].metadata["data_keys"]
    assert "POOLED_MISMATCH" in keys["flag"]["description"]
    assert np.isfinite(stored["primary"]["fit_quality"].read()).all()


@pytest.mark.parametrize("damage", ["shortened", "deleted"])
def test_replay_accounts_for_every_frame_when_the_detector_file_is_damaged(
    runs, derived, model, workspace, phantom, damage, monkeypatch
):
    import tiled.client.utils
    from bluesky import RunEngine
    from ophyd_async.core import init_devices

    from nanobeam_bluesky.devices import (
        FrameSimulator,
        NanoprobeFlyDetector,
        NanoprobeStage,
        RasterPath,
        fly_raster_scan,
    )
    from nanobeam_bluesky.quality import Flag
    from nanobeam_bluesky.tiled.replay import replay_run

    n = 3
    directory = workspace["detector"] / f"damaged-{damage}"
    directory.mkdir()
    RE = RunEngine({})
    with init_devices():
        stage = NanoprobeStage()
        detector = NanoprobeFlyDetector(FrameSimulator(phantom(n, 0.1), seed=4), stage, directory=directory)
    RE.subscribe(tiled_writer(runs, batch_size=8))
    path = RasterPath.grid(0, 0.2, n, 0, 0.2, n, snake=True)
    (uid,) = RE(
        fly_raster_scan(detector, stage, path, exposure_s=0.005, dead_time_s=0.001, flush_period_s=0.1)
    )
    (h5_path,) = directory.glob("*.h5")
    if damage == "shortened":  # the last 4 of 9 frames lost, positions too
        with h5py.File(h5_path, "r+") as h5:
            h5.visititems(
                lambda name, obj: (
                    obj.resize(5, axis=0)
                    if isinstance(obj, h5py.Dataset) and obj.shape[:1] == (n * n,)
                    else None
                )
            )
    else:
        h5_path.unlink()
    writer = tiled_writer(derived, batch_size=8)
    # A missing file is a server error that tiled's client retries for 45 s by default.
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 2.0)
    expected = np.arange(n * n) >= 5 if damage == "shortened" else np.ones(n * n, dtype=bool)
    # From documents() (before Tiled's validator fixes the registered shape, as a first replay
    # finds it): the callback reads the detector file itself. Every raw frame has its row; the
    # rows of a StreamDatum whose frames are not all in the file are flagged, all of them.
    result = replay_run(runs[uid], model.predictor, page_size=4, frames="documents", read_timeout_s=0.5)
    _validated(result.documents)
    rows = result.data()
    np.testing.assert_array_equal(np.sort(rows["raw_seq_num"]), np.arange(1, n * n + 1))
    order = np.argsort(rows["raw_seq_num"])
    flagged = (rows["flag"][order] & Flag.INVALID) != 0
    assert flagged[expected].all() and np.isnan(rows["strain"][order][flagged]).all()
    assert np.isfinite(rows["strain"][order][~flagged]).all()
    assert result.stop["exit_status"] == "fail" and result.stop["num_events"]["primary"] == n * n
    assert "could not be read" in result.stop["reason"], result.stop["reason"]
    # From Tiled's arrays: the validator finds what the file holds; exactly the lost rows flagged.
    result = replay_run(runs[uid], model.predictor, subscribers=[writer], page_size=4)
    rows = result.data()
    # Every raw frame has its row; what could not be read is flagged, never dropped or recounted.
    np.testing.assert_array_equal(rows["raw_seq_num"], np.arange(1, n * n + 1))
    invalid = (rows["flag"] & Flag.INVALID) != 0
    np.testing.assert_array_equal(invalid, expected)
    assert np.isfinite(rows["strain"][~invalid]).all() and np.isnan(rows["strain"][invalid]).all()
    stop = result.stop
    assert stop["exit_status"] == "fail" and stop["num_events"]["primary"] == n * n
    assert "replay could not read frames" in stop["reason"], stop["reason"]
    assert ("rows 6..9" in stop["reason"]) if damage == "shortened" else ("rows 1..9" in stop["reason"])
    stored = derived[result.derived_uid]  # no orphan: the stored derived run has its stop
    assert stored.metadata["stop"]["exit_status"] == "fail"


def test_replay_refuses_a_derived_run(runs, derived, raw_run, model):
    from nanobeam_bluesky.tiled.replay import RunNotFoundError, find_run, replay_run

    derived_uid = next(iter(derived_runs(runs, raw_run["uid"])))
    with pytest.raises(ValueError, match="derived run"):
        replay_run(derived[derived_uid], model.predictor)
    with pytest.raises(RunNotFoundError):
        find_run(runs, 999)


# ---------------------------------------------------------------------------------- MongoDB
MONGO_ENV = "NANOBEAM_TEST_MONGO_URI"


@pytest.fixture(scope="module")
def mongo_catalog(tmp_path_factory):
    """databroker's MongoDB-backed catalog (``MongoAdapter``) served by a real ``tiled serve``.

    Needs a real MongoDB: ``NANOBEAM_TEST_MONGO_URI=mongodb://HOST:27017/DATABASE`` (an empty,
    throw-away database). ``databroker.temp()`` is not used: it runs on mongomock, a mock of
    MongoDB, which proves nothing about a beamline's catalog.
    """
    uri = os.environ.get(MONGO_ENV)
    if not uri:
        pytest.skip(
            f"set {MONGO_ENV}=mongodb://HOST:27017/DATABASE to replay from a MongoDB-backed databroker "
            "catalog: no MongoDB server on this machine (Debian ships none; the pip packages download "
            "mongod at run time), and databroker.temp() is mongomock, a mock, not used for this claim"
        )
    import subprocess
    import sys

    import yaml
    from tiled.client import from_uri

    root = tmp_path_factory.mktemp("mongo")
    key, port = uuid.uuid4().hex, free_port()
    config = {
        "authentication": {"single_user_api_key": f"${{{API_KEY_ENV}}}", "allow_anonymous_access": False},
        "trees": [
            {"path": "/", "tree": "databroker.mongo_normalized:MongoAdapter.from_uri", "args": {"uri": uri}}
        ],
        "uvicorn": {"host": "127.0.0.1", "port": port},
    }
    (root / "config.yml").write_text(yaml.safe_dump(config))
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "tiled", "serve", "config", str(root / "config.yml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, API_KEY_ENV: key},
    )
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (root / "server.log").read_text()
            time.sleep(0.25)
        yield from_uri(f"http://127.0.0.1:{port}", api_key=key)
    finally:
        server.terminate()
        server.wait(20)
        log.close()


def replay_from_a_mongodb_layout_catalog(catalog, predictor, directory: Path, phantom) -> None:
    """A step scan whose frames an area detector wrote to HDF5 (AD_HDF5 Resource/Datum, the
    layout of a MongoDB-backed databroker), written through databroker's own document route,
    then replayed given as the v2 run and as the v1 Header, frames from the server's handlers
    (arrays) and from documents() (read here): the direct predictions, every document valid."""
    from event_model import compose_run

    from nanobeam_bluesky.devices import FrameSimulator
    from nanobeam_bluesky.tiled.replay import replay_run

    n = 6
    frames = FrameSimulator(phantom(4), seed=3).frames_at(np.arange(n) * 0.05, np.zeros(n), 0.01)
    path = directory / f"{uuid.uuid4().hex}.h5"
    with h5py.File(path, "w") as f:
        f["/entry/data/data"] = frames  # (N, H, W); the handler gives a point's (1, H, W)
    bundle = compose_run(metadata={"plan_name": "count", "scan_id": 7, "analysis_stage": "raw"})
    resource = bundle.compose_resource(
        spec="AD_HDF5", root="/", resource_path=str(path).lstrip("/"), resource_kwargs={"frame_per_point": 1}
    )
    keys = {
        "cam_image": {
            "source": "cam",
            "dtype": "array",
            "shape": [1, *frames.shape[1:]],
            "dtype_numpy": np.dtype(frames.dtype).str,
            "external": "FILESTORE:",
        },
        "x": {"source": "x", "dtype": "number", "shape": [], "dtype_numpy": "<f8"},
    }
    descriptor = bundle.compose_descriptor(name="primary", data_keys=keys)
    documents = [("start", bundle.start_doc), ("descriptor", descriptor.descriptor_doc)]
    documents.append(("resource", resource.resource_doc))
    for i in range(n):
        datum = resource.compose_datum(datum_kwargs={"point_number": i})
        event = descriptor.compose_event(
            data={"cam_image": datum["datum_id"], "x": 0.05 * i},
            timestamps=dict.fromkeys(keys, time.time()),
            filled={"cam_image": False},
        )
        documents += [("datum", datum), ("event", event)]
    documents.append(("stop", bundle.compose_stop()))
    for name, doc in _validated(documents):
        catalog.post_document(name, doc)
    uid = bundle.start_doc["uid"]
    direct = predictor.predict(frames)
    for given in (catalog[uid], catalog.v1[uid]):
        for source in ("documents", "arrays"):
            result = replay_run(given, predictor, page_size=4, frames=source)
            _validated(result.documents)
            rows = result.data()
            assert result.rows == n and result.stop["exit_status"] == "success", result.stop
            np.testing.assert_array_equal(rows["raw_seq_num"], np.arange(1, n + 1))
            for p in ("strain", "omega", "chi"):
                np.testing.assert_allclose(rows[p], direct[p].values, rtol=1e-5, atol=1e-9)


def test_replay_from_a_mongodb_backed_databroker_catalog(mongo_catalog, model, workspace, phantom):
    replay_from_a_mongodb_layout_catalog(mongo_catalog, model.predictor, workspace["detector"], phantom)


# ---------------------------------------------------------------------------------- CLI, files
def test_simulate_scan_cli_writes_the_documented_layout(tmp_path):
    from nanobeam_bluesky.cli import main

    out = tmp_path / "scan.h5"
    assert main(["simulate-scan", "--out", str(out), "--size", "3", "--detector", "192"]) == 0
    summary = inspect_scan_file(out)
    assert summary.frames_shape == (3, 3, 192, 192) and summary.roi_center_px == (96.0, 96.0)
    with h5py.File(out, "r") as h5:
        assert h5["/entry"].attrs["format"] == "nanobeam-scan"
        assert set(h5["/entry/sample/truth"]) == {"strain", "omega_deg", "chi_deg"}
    with pytest.raises(ScanFileError, match="does not fit"):
        simulate_scan_file(tmp_path / "x.h5", fig3_phantom(2), detector_shape=(100, 100))


def test_writer_batch_size_keeps_pace_and_shows_rows():
    assert writer_batch_size(points_per_row=165) == 165  # a row at a time
    assert writer_batch_size(points_per_row=165, frame_rate_hz=20, latency_s=2) == 40  # shows in 2 s
    assert writer_batch_size(points_per_row=4, frame_rate_hz=200) == 100  # writes every 0.5 s
    assert writer_batch_size() == 50 and writer_batch_size(frame_rate_hz=0.1) == 1


def test_server_api_key_resolution(tmp_path, monkeypatch):
    from nanobeam_bluesky.tiled.server import resolve_api_key

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    first = resolve_api_key(tmp_path)
    assert len(first) == 64 and resolve_api_key(tmp_path) == first  # kept across restarts
    monkeypatch.setenv(API_KEY_ENV, "fromenv123")
    assert resolve_api_key(tmp_path) == "fromenv123"
    with pytest.raises(ValueError, match="letters and digits"):
        resolve_api_key(tmp_path, "bad key!")
    assert os.environ[API_KEY_ENV] == "fromenv123"


def test_find_run_takes_a_uid_prefix_made_of_digits(runs):
    from event_model import compose_run

    from nanobeam_bluesky.tiled.replay import RunNotFoundError, find_run

    # 2 % of 8-character uid prefixes are all digits: they must still find their run.
    uid = "20261126-0000-4000-8000-" + uuid.uuid4().hex[:12]
    bundle = compose_run(uid=uid, metadata={"scan_id": 777})
    writer = tiled_writer(runs)
    writer("start", bundle.start_doc)
    writer("stop", bundle.compose_stop())
    assert find_run(runs, uid[:8]).metadata["start"]["uid"] == uid
    assert find_run(runs, 777).metadata["start"]["uid"] == uid  # digits that are a scan_id
    with pytest.raises(RunNotFoundError, match="nor a run whose uid starts with"):
        find_run(runs, "99999999")


def test_predict_reads_a_raw_run_from_its_tiled_uri(server, raw_run, tmp_path, capsys, monkeypatch):
    """`nanobeam predict URI`: the frames of a stored raw run, over HTTP with the API key, to
    maps on the scan's grid; the same values as predict() on the frames themselves."""
    import xarray as xr

    from nanobeam_bluesky.cli import main
    from nanobeam_bluesky.inference import load_pretrained

    uri = f"{server.config.runs_url}/{raw_run['uid']}"
    out = tmp_path / "maps.nc"
    code = main(["predict", uri, "--out", str(out), "--api-key", server.api_key, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    ds = xr.open_dataset(out, engine="h5netcdf")
    ny, nx = raw_run["shape"]
    assert ds["strain"].shape == (ny, nx)
    np.testing.assert_allclose(ds["x_um"].values, np.linspace(-1, 1, nx), atol=1e-9)
    np.testing.assert_allclose(ds["y_um"].values, np.linspace(-1, 1, ny), atol=1e-9)
    direct = load_pretrained().predict(raw_run["frames"])
    # Same frames, same model; the pooled check sees the same 12 frames: equal to rounding.
    np.testing.assert_allclose(ds["strain"].values.ravel(), direct["strain"].values, rtol=1e-5, atol=1e-9)
    # A wrong key, or none, is one line that names the fix.
    assert main(["predict", uri, "--out", str(out), "--api-key", "x" * 32]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused the API key" in err and "NANOBEAM_TILED_API_KEY" in err
    for name in ("NANOBEAM_TILED_API_KEY", "TILED_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert main(["predict", uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs an API key" in err and "--api-key" in err
