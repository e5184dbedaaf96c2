"""`nanobeam predict`: each input kind to maps on the scan grid, checked against the truth."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import xarray as xr

from nanobeam_bluesky.cli import main
from nanobeam_bluesky.departures import DEPARTURES
from nanobeam_bluesky.formats import MdaFile, MdaPositioner, MdaScan, write_mda
from nanobeam_bluesky.phantoms import fig3_phantom
from nanobeam_bluesky.physics import PARAMETERS, Instrument
from nanobeam_bluesky.quality import Flag
from nanobeam_bluesky.scanfile import simulate_scan_file
from nanobeam_bluesky.scans import grid_of_positions, open_scan, predict_scan, read_positions

pytestmark = pytest.mark.integration


def _z_rms(ds: xr.Dataset, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """RMS of (estimate - truth) / stated error over the unflagged points, per parameter."""
    ok = ds["flag"].values == 0
    return {
        p: float(np.sqrt(np.mean(((ds[p].values - truth[p]) / ds[f"{p}_err"].values)[ok] ** 2)))
        for p in PARAMETERS
    }


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    """Our own scan file: 10 x 10 points of the Fig. 3 phantom on a 256 x 256 detector, the
    reflection off centre (the ROI must be cut where the file says)."""
    path = tmp_path_factory.mktemp("predict") / "scan.h5"
    phantom = fig3_phantom(10)
    simulate_scan_file(path, phantom, detector_shape=(256, 256), roi_center_px=(100.0, 150.0), rng=3)
    return path, phantom


def test_predict_our_scan_file_gives_maps_within_their_stated_error(scan_file, tmp_path, capsys):
    path, phantom = scan_file
    out = tmp_path / "maps.nc"
    assert main(["predict", str(path), "--out", str(out), "--png", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "100 frames" in printed and "10 x 10 maps" in printed
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert ds["strain"].dims == ("scan_y", "scan_x") and ds["strain"].shape == (10, 10)
    assert ds["x_um"].attrs["units"] == "µm"
    np.testing.assert_allclose(ds["x_um"].values, phantom.x_um, atol=1e-9)
    np.testing.assert_allclose(ds["y_um"].values, phantom.y_um, atol=1e-9)
    assert int((ds["flag"].values != 0).sum()) == 0  # ideal frames: nothing to flag
    truth = {"strain": phantom.strain, "omega": phantom.omega_deg, "chi": phantom.chi_deg}
    z = _z_rms(ds, truth)
    # 100 points: the RMS of N(0, 1) z-scores lies within 0.75..1.3 with > 99 % probability.
    assert all(0.6 < v < 1.4 for v in z.values()), z
    np.testing.assert_allclose(ds["strain_true"].values, phantom.strain)
    assert (tmp_path / "maps.png").stat().st_size > 10_000


def test_fit_reads_our_own_scan_file(scan_file, tmp_path, capsys):
    """`nanobeam fit` on what `nanobeam simulate-scan` writes: the ROI cut where the file says,
    the raster as a map."""
    path, phantom = scan_file
    out = tmp_path / "fit.nc"
    args = [
        "fit",
        "--scan",
        str(path),
        "--out",
        str(out),
        "--grid",
        "21",
        "--method",
        "ours",
        "--no-progress",
    ]
    assert main(args) == 0
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert ds["strain"].shape == (10, 10)
    # Our likelihood fit reaches about the bound (8.5e-5 in strain at 7 counts): a misplaced ROI
    # or a scrambled raster would be off by the phantom's whole range (4e-3).
    rmse = float(np.sqrt(np.mean((ds["strain"].values - phantom.strain) ** 2)))
    assert rmse < 2.5e-4, rmse


def test_detector_frames_without_a_known_roi_centre_are_one_line_errors(scan_file, tmp_path, capsys):
    path, _ = scan_file
    bare = tmp_path / "bare.h5"
    with h5py.File(path) as src, h5py.File(bare, "w") as dst:
        dst.create_dataset("/entry/data/data", data=src["/entry/data/data"][:2, :2])
    assert main(["predict", str(bare), "--out", str(tmp_path / "m.nc")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--roi-center ROW COL" in err
    # With the centre given, the same file is analysed.
    assert (
        main(
            [
                "predict",
                str(bare),
                "--out",
                str(tmp_path / "m.nc"),
                "--roi-center",
                "100",
                "150",
                "--no-progress",
            ]
        )
        == 0
    )


def test_areadetector_nexus_file_with_positions_in_mm(tmp_path):
    """An areaDetector HDF5 file: frames (N, 1, H, W) at /entry/data/data, the stage positions as
    NDAttributes in mm; a snake raster of 4 x 5 points."""
    made = DEPARTURES[0].make(20, np.random.default_rng(1), Instrument())
    ny, nx = 4, 5
    rows, cols = np.divmod(np.arange(ny * nx), nx)
    cols = np.where(rows % 2 == 1, nx - 1 - cols, cols)  # snake
    path = tmp_path / "ad.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/entry/data/data", data=made.counts[:, None].astype(np.uint16))
        attrs = h5.create_group("/entry/instrument/NDAttributes")
        attrs.create_dataset("SampleX", data=1e-3 * (2.0 + 0.1 * cols)).attrs["units"] = "mm"
        attrs.create_dataset("SampleY", data=1e-3 * (5.0 + 0.2 * rows)).attrs["units"] = "mm"
    source = open_scan(path)
    assert source.positions is not None and source.positions.shape == (ny, nx)
    maps = predict_scan(source, _predictor(), progress=False).dataset
    np.testing.assert_allclose(maps["x_um"].values, 2.0 + 0.1 * np.arange(nx), atol=1e-9)
    np.testing.assert_allclose(maps["y_um"].values, 5.0 + 0.2 * np.arange(ny), atol=1e-9)
    # Each point is where the stage was: the frame index on the grid follows the snake.
    assert maps["frame"].values[1, 0] == 9 and maps["frame"].values[1, 4] == 5
    truth = {p: made.params[maps["frame"].values, i] for i, p in enumerate(PARAMETERS)}
    z = _z_rms(maps, truth)
    assert all(v < 1.8 for v in z.values()), z


def _predictor():
    from nanobeam_bluesky.inference import load_pretrained

    return load_pretrained()


def _write_tiffs(directory, frames):
    import tifffile

    directory.mkdir()
    for i, frame in enumerate(frames):  # names sort by number, not as text: 2 before 10
        tifffile.imwrite(directory / f"scan_{i + 1}.tif", frame.astype(np.uint16))


def test_tiff_directory_with_csv_positions_and_departures(tmp_path):
    """TIFF frames with 5 hot pixels each (30-3000 counts): flagged, and within the stated error."""
    rng = np.random.default_rng(2)
    hot = next(d for d in DEPARTURES if d.name.startswith("5 hot"))
    made = hot.make(12, rng, Instrument())
    _write_tiffs(tmp_path / "tiffs", made.counts)
    ny, nx = 3, 4
    rows, cols = np.divmod(np.arange(ny * nx), nx)
    csv = tmp_path / "positions.csv"
    csv.write_text(
        "# a raster\nx_nm,y_nm\n" + "".join(f"{100 * c},{250 * r}\n" for r, c in zip(rows, cols, strict=True))
    )
    out = tmp_path / "maps.h5"
    assert (
        main(
            ["predict", str(tmp_path / "tiffs"), "--positions", str(csv), "--out", str(out), "--no-progress"]
        )
        == 0
    )
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert ds["strain"].shape == (ny, nx)
    np.testing.assert_allclose(ds["x_um"].values, 0.1 * np.arange(nx))
    truth = {p: made.params[ds["frame"].values, i] for i, p in enumerate(PARAMETERS)}
    flags = ds["flag"].values
    # Every frame's hot pixels are found and masked; the values, from the other pixels, keep
    # their stated error.
    assert np.all(flags & Flag.HOT_PIXEL)
    masked_only = flags == Flag.HOT_PIXEL
    assert masked_only.sum() >= 9
    for p in PARAMETERS:
        z = (ds[p].values - truth[p]) / ds[f"{p}_err"].values
        assert np.sqrt(np.mean(z[masked_only] ** 2)) < 2.0, (p, z)


def test_mda_positions_place_the_frames_of_a_2d_scan(tmp_path):
    ny, nx = 3, 4
    made = DEPARTURES[0].make(ny * nx, np.random.default_rng(4), Instrument())
    _write_tiffs(tmp_path / "tiffs", made.counts)

    def positioner(name, values, unit):
        return MdaPositioner(0, name, name, unit, name, name, unit, np.asarray(values, dtype=np.float64))

    inner = [
        MdaScan(1, nx, nx, [positioner("26idcnpi:m17", 0.001 * np.arange(nx), "mm")], []) for _ in range(ny)
    ]
    outer = MdaScan(2, ny, ny, [positioner("26idcnpi:m18", 0.5 * np.arange(ny), "um")], [], inner=inner)
    mda = tmp_path / "scan_0042.mda"
    write_mda(mda, MdaFile(1.4, 42, 2, (ny, nx), outer))
    positions = read_positions(mda)
    assert positions.shape == (ny, nx)
    source = open_scan(tmp_path / "tiffs").with_positions(positions)
    maps = predict_scan(source, _predictor(), progress=False).dataset
    np.testing.assert_allclose(maps["x_um"].values, np.arange(nx), atol=1e-9)
    np.testing.assert_allclose(maps["y_um"].values, 0.5 * np.arange(ny), atol=1e-9)
    np.testing.assert_array_equal(maps["frame"].values, np.arange(ny * nx).reshape(ny, nx))


def test_positions_of_another_scan_are_refused(tmp_path, capsys):
    made = DEPARTURES[0].make(6, np.random.default_rng(5), Instrument())
    _write_tiffs(tmp_path / "tiffs", made.counts)
    csv = tmp_path / "p.csv"
    csv.write_text("x_um,y_um\n0,0\n1,0\n")
    assert (
        main(["predict", str(tmp_path / "tiffs"), "--positions", str(csv), "--out", str(tmp_path / "m.nc")])
        == 2
    )
    err = capsys.readouterr().err
    assert "2 positions for the 6 frames" in err and len(err.strip().splitlines()) == 1


def test_a_file_of_the_wrong_kind_is_a_one_line_error(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    assert main(["predict", str(notes), "--out", str(tmp_path / "m.nc")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a scan this reads" in err


@pytest.mark.unit
def test_grid_of_positions_finds_snake_rasters_and_line_scans():
    rows, cols = np.divmod(np.arange(12), 4)
    cols = np.where(rows % 2, 3 - cols, cols)
    jitter = np.random.default_rng(0).normal(0, 0.01, (2, 12))  # encoder noise, 1 % of a step
    grid = grid_of_positions(cols + jitter[0], 2.0 * rows + jitter[1])
    assert grid.shape == (3, 4)
    np.testing.assert_array_equal(grid.col, cols)
    np.testing.assert_array_equal(grid.row, rows)
    line = grid_of_positions(np.linspace(0, 1, 7), np.zeros(7))
    assert line.shape == (7,) and line.row is None


def test_check_orientation_command_rejects_a_transposed_reading(scan_file, tmp_path, capsys):
    """The file is in physics.md's orientation: every transposed reading is rejected, and the
    flips the frames cannot tell apart are named with what settles them."""
    path, _ = scan_file
    png = tmp_path / "orientation.png"
    assert main(["check-orientation", str(path), "--out", str(png), "--frames", "64"]) == 0
    out = capsys.readouterr().out
    rejected = next(line for line in out.splitlines() if line.strip().startswith("rejected"))
    assert all(f"transpose{extra} (" in rejected for extra in ("", " + flip rows", " + flip cols"))
    assert "best: transpose" not in out and "tilt χ by a known" in out
    assert png.stat().st_size > 20_000


def test_a_damaged_frame_costs_its_own_row_not_the_scan(tmp_path, capsys):
    """One TIFF of the scan is truncated: its row is flagged INVALID with no value, the others
    are analysed, and the command says which frame."""
    made = DEPARTURES[0].make(8, np.random.default_rng(6), Instrument())
    _write_tiffs(tmp_path / "tiffs", made.counts)
    damaged = tmp_path / "tiffs" / "scan_5.tif"
    damaged.write_bytes(damaged.read_bytes()[:100])
    out = tmp_path / "maps.nc"
    assert main(["predict", str(tmp_path / "tiffs"), "--out", str(out), "--no-progress"]) == 0
    assert "1 frames unreadable, flagged INVALID: frame 4 unreadable" in capsys.readouterr().out
    ds = xr.open_dataset(out, engine="h5netcdf")
    flags = ds["flag"].values
    assert flags[4] == Flag.INVALID and np.isnan(ds["strain"].values[4])
    others = np.arange(8) != 4
    assert np.all(np.isfinite(ds["strain"].values[others])) and not np.any(flags[others] & Flag.INVALID)
    assert "frame 4 unreadable" in ds.attrs["problems"]


@pytest.mark.unit
def test_tiled_run_positions_are_converted_to_micrometres_by_their_units():
    from nanobeam_bluesky.errors import InputError
    from nanobeam_bluesky.tiled.source import _to_um

    values = np.array([0.001, 0.002])
    np.testing.assert_allclose(_to_um(values, {"units": "mm"}, "x"), [1.0, 2.0])
    np.testing.assert_allclose(_to_um(values, {"units": None}, "x"), values)  # no units: µm
    with pytest.raises(InputError, match=r"'theta' is in 'deg', not a length.*--positions"):
        _to_um(values, {"units": "deg"}, "theta")


def test_predict_takes_a_mask_file_and_refuses_a_wrong_one(scan_file, tmp_path, capsys):
    """--mask M.npy (what calibrate --out-mask writes: raw ROI, detector orientation): those pixels
    are left out; a mask of the wrong shape, or a file that is not one, is a one-line error."""
    path, _ = scan_file
    mask = np.zeros((128, 128), dtype=bool)
    mask[60:62, :] = True  # a module gap across the reflection
    np.save(tmp_path / "mask.npy", mask)
    out = tmp_path / "maps.nc"
    assert (
        main(["predict", str(path), "--out", str(out), "--mask", str(tmp_path / "mask.npy"), "--no-progress"])
        == 0
    )
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert (ds["flag"].values == 0).mean() > 0.95  # the gap holds counts, but is not believed
    np.save(tmp_path / "small.npy", np.zeros((10, 10), dtype=bool))
    (tmp_path / "text.npy").write_text("not an array")
    for bad, message in (
        ("small.npy", "mask must be (64, 64) or (128, 128)"),
        ("text.npy", "not a readable .npy"),
    ):
        capsys.readouterr()
        assert (
            main(["predict", str(path), "--out", str(out), "--mask", str(tmp_path / bad), "--no-progress"])
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
