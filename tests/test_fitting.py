"""The correlation fit (faithful and ours), its chunking and memory, its refusals, and the phantoms."""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest
import xarray as xr

from nanobeam_bluesky.cli import main
from nanobeam_bluesky.fitting import (
    PARAMETERS,
    CorrelationFitter,
    Library,
    LibraryMismatchError,
    LikelihoodFitter,
    make_fitter,
)
from nanobeam_bluesky.inference import Flag
from nanobeam_bluesky.phantoms import Phantom, fig3_phantom, simulate_scan
from nanobeam_bluesky.physics import Instrument, crlb, simulate, to_counts, write_library

# A small box with the 41-point grid's spacing (2.5e-4, 0.0025 deg, 0.005 deg) so that 9 points
# per axis behave like the real library around its centre. upsample 4 keeps it fast.
SMALL = Instrument(strain_range=(-0.001, 0.001), omega_range_deg=(-0.01, 0.01), chi_range_deg=(-0.02, 0.02))
GRID = 9
UPSAMPLE = 4
STEP = np.array([2.5e-4, 0.0025, 0.005])


@pytest.fixture(scope="module")
def library() -> Library:
    return Library.from_instrument(SMALL, GRID, upsample=UPSAMPLE).load()  # simulated once


@pytest.fixture(scope="module")
def faithful(library) -> CorrelationFitter:
    return CorrelationFitter(library, progress=False)


@pytest.fixture(scope="module")
def ours(library) -> LikelihoodFitter:
    return LikelihoodFitter(library, progress=False)


def _on_grid(library: Library, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free expected counts (7 at the Laue maximum) at random grid points, and the truth."""
    idx = np.random.default_rng(seed).integers(0, GRID, (n, 3))
    truth = np.stack([library.axes[p][idx[:, i]] for i, p in enumerate(PARAMETERS)], axis=1)
    return 7 * simulate(*truth.T, SMALL, upsample=UPSAMPLE), truth


def _estimates(result: xr.Dataset) -> np.ndarray:
    return np.stack([result[p].values.ravel() for p in PARAMETERS], axis=1)


def _literal_reference(frames: np.ndarray, library: Library) -> np.ndarray:
    """physics.md's conventional method as one dense float64 broadcast, the way it was first run."""
    lib = np.concatenate([s.astype(np.float64) for s in library.iter_unit_slabs(progress=False)])
    lib = lib.reshape(*library.shape, -1)
    m = frames.reshape(len(frames), -1).astype(np.float64)
    m /= m.sum(axis=1, keepdims=True)
    c = np.einsum("np,ijkp->nijk", m, lib)
    out = []
    for axis, name in enumerate(PARAMETERS):
        marginal = c.sum(axis=tuple(a + 1 for a in range(3) if a != axis))
        marginal -= marginal.min(axis=1, keepdims=True)
        out.append(marginal @ library.axes[name] / marginal.sum(axis=1))
    return np.stack(out, axis=1)


# ---------------------------------------------------------------------------- the faithful method
@pytest.mark.parametrize("strategy", ["summed", "full"])
def test_faithful_fit_is_the_published_arithmetic(library, strategy):
    frames, _ = _on_grid(library, 24, seed=1)
    counts = to_counts(frames / 7, 7.0, scale=1.0, rng=2)
    fitted = _estimates(CorrelationFitter(library, strategy=strategy, progress=False).fit(counts))
    # float32 products against a float64 reference: agreement to 1e-3 of a grid step (measured 1e-4).
    reference = _literal_reference(counts, library)
    np.testing.assert_allclose(fitted / STEP, reference / STEP, rtol=0, atol=1e-3)


def test_faithful_fit_on_grid_points_is_symmetric_and_ordered(library, faithful):
    """The published estimator does not return grid points exactly (min-subtracted centres of mass
    of broad marginals; see the README's Fig. 3 numbers). What it must do: the grid centre comes
    back as the centre, chi = 0 stays 0 (mirror symmetry), and along each axis (others at the
    centre) the estimate rises with the truth and has its sign."""
    mid = GRID // 2
    centre = {p: library.axes[p][mid] for p in PARAMETERS}
    assert centre == pytest.approx({"strain": 0.0, "omega": 0.0, "chi": 0.0}, abs=1e-12)
    for axis, name in enumerate(PARAMETERS):
        truth = np.zeros((GRID, 3))
        truth[:, axis] = library.axes[name]
        est = _estimates(faithful.fit(7 * simulate(*truth.T, SMALL, upsample=UPSAMPLE)))
        assert np.all(np.diff(est[:, axis]) > 0), name
        off_centre = np.arange(GRID) != mid
        assert np.all(np.sign(est[off_centre, axis]) == np.sign(truth[off_centre, axis])), name
        assert abs(est[mid, axis]) < 0.05 * STEP[axis], name  # measured 0.03 steps (strain)
        if name != "chi":
            assert np.abs(est[:, 2]).max() < 1e-3 * STEP[2], name  # chi = 0 along the sweep


def test_faithful_summed_and_full_strategies_agree(library, faithful):
    counts = to_counts(_on_grid(library, 30, seed=3)[0] / 7, 7.0, scale=1.0, rng=4)
    summed = _estimates(faithful.fit(counts))
    full = _estimates(CorrelationFitter(library, strategy="full", progress=False).fit(counts))
    # Same arithmetic in another order: float32 rounding only, < 1e-3 grid steps (measured 1e-4).
    np.testing.assert_allclose(summed / STEP, full / STEP, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------- ours
@pytest.mark.parametrize("stride", [1, 2])
def test_ours_recovers_noise_free_grid_points(library, stride):
    frames, truth = _on_grid(library, 60, seed=5)
    result = LikelihoodFitter(library, coarse_stride=stride, progress=False).fit(frames)
    err = (_estimates(result) - truth) / STEP
    # Measured max 0.08 steps (edges of the box included); allowed 0.15 grid steps per axis.
    assert np.abs(err).max() < 0.15
    # Noise-free frames are not counts: flagged as such, and nothing else.
    assert (result.flag.values == Flag.NON_INTEGER).all()
    described = library.instrument.replace(integer_counts=False)
    again = LikelihoodFitter(library, coarse_stride=stride, progress=False).fit(frames, instrument=described)
    assert (again.flag.values == 0).all()


def test_ours_reaches_the_cramer_rao_bound_off_grid(library, ours):
    rng = np.random.default_rng(6)
    truth = rng.uniform(-2, 2, (150, 3)) * STEP  # inside the box, off the grid
    counts = to_counts(simulate(*truth.T, SMALL, upsample=UPSAMPLE), 7.0, scale=1.0, rng=rng)
    result = ours.fit(counts)
    err = _estimates(result) - truth
    rmse = np.sqrt((err**2).mean(axis=0))
    bound = crlb(0.0, 0.0, 0.0, SMALL)[0]
    assert np.all(rmse < 1.6 * bound), (rmse, bound)  # measured ~1.1x
    faithful_err = _estimates(CorrelationFitter(library, progress=False).fit(counts)) - truth
    faithful_rmse = np.sqrt((faithful_err**2).mean(axis=0))
    assert np.all(rmse < 0.8 * faithful_rmse), (rmse, faithful_rmse)  # measured 0.63, 0.14, 0.15
    std = np.stack([result[f"{p}_std"].values for p in PARAMETERS], axis=1)
    z = np.sqrt(((err / std) ** 2).mean(axis=0))
    assert np.all((z > 0.7) & (z < 2.0)), z  # the Laplace std is the right order (measured ~1-1.5)


def test_make_fitter_names_methods(library):
    assert isinstance(make_fitter("faithful", library, progress=False), CorrelationFitter)
    assert isinstance(make_fitter("ours", library, progress=False), LikelihoodFitter)
    with pytest.raises(ValueError, match="unknown fit method 'best'"):
        make_fitter("best", library)


# ---------------------------------------------------------------------------- chunking and memory
@pytest.mark.parametrize("method", ["faithful", "faithful-full", "ours"])
def test_chunked_and_unchunked_results_agree(library, method):
    """Chunk sizes 1, 7 and all give the same fit. Not bit for bit: BLAS picks its float32 kernel by
    matrix size, so the summation order of the 4096-pixel products changes with the chunk
    (float32 relative error ~ sqrt(4096) * 6e-8 = 4e-6 on a correlation; measured up to 2e-6 of a
    grid step in the estimate). Allowed: 1e-4 of a grid step, far below any physical resolution."""
    counts = to_counts(_on_grid(library, 30, seed=7)[0] / 7, 7.0, scale=1.0, rng=8)
    kwargs = {"strategy": "full"} if method == "faithful-full" else {}
    cls = LikelihoodFitter if method == "ours" else CorrelationFitter
    whole = cls(library, chunk_size=len(counts), progress=False, **kwargs).fit(counts)
    for chunk in (1, 7):
        chunked = cls(library, chunk_size=chunk, progress=False, **kwargs).fit(counts)
        assert chunked.flag.values.tolist() == whole.flag.values.tolist()
        for axis, name in enumerate(PARAMETERS):
            np.testing.assert_allclose(
                chunked[name].values / STEP[axis],
                whole[name].values / STEP[axis],
                rtol=0,
                atol=1e-4,
                err_msg=name,
            )


@pytest.mark.integration  # statistics over thousands of frames, or training: slow
@pytest.mark.parametrize("method", ["faithful-full", "ours"])
def test_memory_stays_bounded_when_the_map_grows(library, method):
    cls = LikelihoodFitter if method == "ours" else CorrelationFitter
    kwargs = {"strategy": "full"} if method == "faithful-full" else {}
    fitter = cls(library, chunk_size=16, progress=False, **kwargs)
    frames = to_counts(_on_grid(library, 40, seed=9)[0] / 7, 7.0, scale=1.0, rng=10)
    # A large map, so that allocations of other threads while tracing (~100 kB seen) stay small
    # next to the per-frame allowance.
    small, large = frames[:32], np.concatenate([frames] * 100)[:3840]
    fitter.fit(small)  # warm-up: first-call allocations are not the fit's
    peaks, largest = [], []
    for data in (small, large):
        tracemalloc.start()
        fitter.fit(data)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        largest.append(fitter.last_stats["largest_intermediate_bytes"])
    # The largest intermediate is a chunk's, the same for 32 and 3,840 frames.
    assert largest[0] == largest[1] <= 16 * max(library.n_frames, 27 * library.n_pixels) * 4
    # The peak grows only by the per-frame outputs (a few float64 per frame, kept twice while the
    # Dataset is built): allowed 200 B per extra frame, far below one unchunked correlation row.
    growth = peaks[1] - peaks[0]
    assert growth < 200 * (len(large) - len(small)), (peaks, growth)
    # An unchunked fit would hold every frame as float32 counts and unit-sum frames, plus a full
    # correlation row (faithful) or 27 gathered library rows (ours) per frame.
    row = library.n_frames if method == "faithful-full" else 27 * library.n_pixels
    assert peaks[1] < 0.2 * len(large) * 4 * (2 * library.n_pixels + row)


def test_map_input_gives_scan_dims_and_reads_lazily_from_hdf5(library, faithful, ours, tmp_path):
    frames = to_counts(_on_grid(library, 12, seed=11)[0] / 7, 7.0, scale=1.0, rng=12)
    flat = ours.fit(frames)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as h5:
        h5["frames"] = frames.reshape(3, 4, *frames.shape[1:])
    with h5py.File(path, "r") as h5:
        mapped = LikelihoodFitter(library, chunk_size=5, progress=False).fit(h5["frames"])
    assert mapped.strain.dims == ("scan_y", "scan_x") and mapped.strain.shape == (3, 4)
    for name in PARAMETERS:
        np.testing.assert_allclose(mapped[name].values.ravel(), flat[name].values, rtol=1e-12)
    assert faithful.fit(frames[0]).sizes["frame"] == 1  # one (F, F) frame


def test_unusable_frames_get_nan_and_a_flag(ours):
    frames = np.ones((4, 64, 64), dtype=np.float32)  # a flat field: no ring
    frames[0] = 0
    frames[1, 3, 3] = np.nan
    frames[3] = to_counts(simulate(0.0, 0.0, 0.0, SMALL, upsample=UPSAMPLE), 7.0, scale=1.0, rng=1)[0]
    result = ours.fit(frames)
    assert result.flag.values.tolist() == [Flag.LOW_COUNTS, Flag.INVALID, Flag.NO_RING, 0]
    assert np.isnan(result.strain.values[:3]).all() and np.isfinite(result.strain.values[3])
    assert abs(result.fit_quality.values[3]) < 4 and np.isnan(result.fit_quality.values[:2]).all()


def test_library_from_file_fits_like_the_simulated_one(tmp_path):
    path = write_library(tmp_path / "lib.h5", SMALL, grid_points=5, upsample=2, progress=False)
    frames = 7 * simulate([0.0, 5e-4], [0.005, -0.005], [0.0, 0.01], SMALL, upsample=2)
    from_file = CorrelationFitter.from_file(path, progress=False).fit(frames)
    in_memory = CorrelationFitter.from_instrument(SMALL, 5, upsample=2, progress=False).fit(frames)
    for name in PARAMETERS:
        np.testing.assert_allclose(from_file[name].values, in_memory[name].values, rtol=1e-6)
    assert from_file.attrs["library_source"] == str(path)


# ---------------------------------------------------------------------------- refusals
def test_a_library_with_another_frame_shape_is_refused(library, faithful):
    with pytest.raises(LibraryMismatchError, match=r"\(32, 32\).*\(64, 64\).*bin_roi"):
        faithful.fit(np.ones((2, 32, 32), dtype=np.float32))
    small_detector = SMALL.replace(roi_pixels=64)  # 32 x 32 frames from 64 x 64 raw ROIs
    other = Library.from_instrument(small_detector, 3, upsample=1)
    with pytest.raises(LibraryMismatchError, match=r"library's are \(32, 32\) \(raw ROIs \(64, 64\)\)"):
        CorrelationFitter(other, progress=False).fit(np.ones((2, 48, 48), dtype=np.float32))


def test_a_library_for_another_instrument_is_refused(ours):
    frames = 7 * simulate(0.0, 0.0, 0.0, SMALL, upsample=UPSAMPLE)
    other = SMALL.replace(energy_kev=10.0)
    expected = r"another instrument \(energy_kev: library 11.3 vs data 10.0"
    with pytest.raises(LibraryMismatchError, match=expected):
        ours.fit(frames, instrument=other)
    # The fit itself does not care about ranges or labels, and an explicit override is allowed.
    ours.fit(frames, instrument=SMALL.replace(strain_range=(-0.01, 0.01)))
    assert np.isfinite(ours.fit(frames, instrument=other, allow_instrument_mismatch=True).strain).all()


def test_bad_settings_are_refused(library):
    with pytest.raises(ValueError, match="chunk_size"):
        CorrelationFitter(library, chunk_size=0)
    with pytest.raises(ValueError, match="strategy"):
        CorrelationFitter(library, strategy="dense")
    with pytest.raises(ValueError, match="coarse_stride"):
        LikelihoodFitter(library, coarse_stride=0)
    with pytest.raises(ValueError, match=r"\(N, F, F\)"):
        CorrelationFitter(library, progress=False).fit(np.ones(64))


# ---------------------------------------------------------------------------- phantoms
def test_fig3_phantom_shape_ranges_and_structure():
    inst = Instrument()
    p = fig3_phantom()
    assert p.shape == (165, 165) and p.x_um.shape == (165,) and p.y_um[1] == pytest.approx(0.05)
    for arr, name in ((p.strain, "strain"), (p.omega_deg, "omega"), (p.chi_deg, "chi")):
        low, high = inst.parameter_ranges[name]
        half = 0.5 * (high - low)
        # fill = 0.8: the maps stay inside 80 % of the box and reach most of it.
        assert arr.min() >= -0.8 * half - 1e-12 and arr.max() <= 0.8 * half + 1e-12, name
        assert arr.max() - arr.min() > 1.5 * half, name
    # strain: the 2D sinusoid, exactly, at every pixel
    u = np.arange(165) / 164
    expected = 0.004 * np.sin(3 * np.pi * u)[:, None] * np.sin(3 * np.pi * u)[None, :]
    np.testing.assert_allclose(p.strain, expected, atol=1e-15)
    # omega: steps rising along 30 deg from x; chi: steps falling along 110 deg. Each is a function
    # of the position along its direction only, monotone, and two sigmoidal steps make three
    # terraces that hold most of the map.
    rows, cols = np.indices(p.shape)
    for arr, angle, sign, half in ((p.omega_deg, 30, 1, 0.04), (p.chi_deg, 110, -1, 0.08)):
        a = np.radians(angle)
        r = cols * np.cos(a) + rows * np.sin(a)
        order = np.argsort(r, axis=None, kind="stable")
        along = sign * arr.ravel()[order]
        assert np.all(np.diff(along) >= -1e-12), angle
        terraces = [np.abs(arr - level).ravel() < 0.05 * half for level in (-half, 0.0, half)]
        assert all(t.mean() > 0.1 for t in terraces), angle
        assert np.mean(np.any(terraces, axis=0)) > 0.6, angle  # measured 0.64, 0.68
    assert fig3_phantom((7, 11)).shape == (7, 11)


def test_phantom_values_at_stage_positions():
    p = fig3_phantom(20)
    # at a pixel's own position: its values, with either method
    for method in ("linear", "nearest"):
        got = p.values_at(p.x_um[5], p.y_um[13], method=method)
        assert got == pytest.approx((p.strain[13, 5], p.omega_deg[13, 5], p.chi_deg[13, 5]), abs=1e-15)
    # half way between two columns: their mean; outside the map: the edge
    mid = p.values_at(0.5 * (p.x_um[5] + p.x_um[6]), p.y_um[13])
    assert mid[0] == pytest.approx(0.5 * (p.strain[13, 5] + p.strain[13, 6]))
    assert p.values_at(-3.0, 1e3)[1] == pytest.approx(p.omega_deg[-1, 0])
    strain, _, _ = p.values_at(p.x_um, p.y_um[2])
    np.testing.assert_allclose(strain, p.strain[2])
    ds = p.to_dataset()
    assert ds.strain.dims == ("scan_y", "scan_x") and ds.x_um.attrs["units"] == "um"
    with pytest.raises(ValueError, match="one shape"):
        Phantom(np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((2, 2)))


def test_simulate_scan_counts_follow_the_library_wide_convention():
    p = fig3_phantom(5)
    inst = Instrument()
    expected = simulate_scan(p, inst, 7.0, noise=False, upsample=2, progress=False)
    assert expected.shape == (5, 5, 64, 64) and expected.dtype == np.float32
    truth = simulate(*p.parameters(), inst, upsample=2).reshape(5, 5, 64, 64)
    np.testing.assert_allclose(expected, 7 * truth, rtol=1e-6)
    a = simulate_scan(p, inst, 7.0, rng=3, upsample=2, progress=False)
    b = simulate_scan(p, inst, 7.0, rng=3, upsample=2, chunk_size=4, progress=False)
    np.testing.assert_array_equal(a, b)  # the draws do not depend on the chunking
    assert np.all(a == np.round(a)) and a.dtype == np.float32
    # Poisson: total counts within 1 % of the expectation over 25 frames of ~7,000 counts
    assert a.sum() == pytest.approx(expected.sum(), rel=0.01)


# ---------------------------------------------------------------------------- command line
def test_cli_fits_a_phantom_and_a_saved_scan(tmp_path, capsys):
    lib = write_library(tmp_path / "lib.h5", SMALL, grid_points=5, upsample=2, progress=False)
    out = tmp_path / "fit.nc"
    args = [
        "fit",
        "--library",
        str(lib),
        "--phantom",
        "4",
        "--out",
        str(out),
        "--method",
        "ours",
        "--upsample",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    result = xr.load_dataset(out, engine="h5netcdf")
    assert result.strain.shape == (4, 4) and "strain_true" in result and result.attrs["method"] == "ours"
    assert "RMSE" in capsys.readouterr().out
    frames = 7 * simulate([0.0, 2e-4], [0.0, 0.004], [0.0, -0.01], SMALL, upsample=2)
    np.save(tmp_path / "frames.npy", frames)
    out2 = tmp_path / "fit2.h5"
    assert (
        main(
            [
                "fit",
                "--library",
                str(lib),
                "--scan",
                str(tmp_path / "frames.npy"),
                "--out",
                str(out2),
                "--chunk",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert xr.load_dataset(out2, engine="h5netcdf").sizes["frame"] == 2
    # a scan that does not match the library: a clear error, exit code 2
    np.save(tmp_path / "small.npy", np.ones((2, 32, 32), dtype=np.float32))
    assert (
        main(
            [
                "fit",
                "--library",
                str(lib),
                "--scan",
                str(tmp_path / "small.npy"),
                "--out",
                str(tmp_path / "x.nc"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "bin_roi" in capsys.readouterr().err
